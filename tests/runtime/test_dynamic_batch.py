"""One artifact compiled with a symbolic batch dimension serves every batch size 1..64 with one library.

The artifact is exported and loaded back (what an app ships), then run at each size: every size is checked
against torch, and a few sizes also against artifacts compiled for exactly that static size.
"""

import numpy as np
import pytest
import torch
from conftest import assert_close
from models import MLP, seeded

import ember

STATIC_SIZES = (1, 17, 64)


@pytest.fixture(scope="module")
def model():
    return seeded(MLP)


@pytest.fixture(scope="module")
def dynamic(model, tmp_path_factory):
    path = ember.compile(model, (torch.randn(4, 32),), dynamic_batch=True).export(
        tmp_path_factory.mktemp("dyn") / "mlp")
    return ember.load(path)


def _x(batch):
    return torch.randn(batch, 32, generator=torch.Generator().manual_seed(1000 + batch))


def test_manifest_declares_symbolic_batch(dynamic):
    assert dynamic.inputs[0].shape == ("batch", 32)
    assert dynamic.outputs[0].shape == ("batch", 10)


def test_every_batch_size_1_to_64_matches_torch(model, dynamic):
    for batch in range(1, 65):
        x = _x(batch)
        with torch.no_grad():
            ref = model(x).numpy()
        out = dynamic(x.numpy())
        assert out.shape == (batch, 10)
        assert_close(out, ref, what=f"dynamic artifact at batch {batch}")


@pytest.mark.slow
@pytest.mark.parametrize("batch", STATIC_SIZES)
def test_matches_per_size_static_compile(model, dynamic, batch, tmp_path):
    static = ember.load(ember.compile(model, (_x(batch),)).export(tmp_path / f"static{batch}"))
    assert static.inputs[0].shape == (batch, 32)
    x = _x(batch).numpy()
    # Both are fp32 kernels for the same math; only loop order/vectorisation may differ.
    np.testing.assert_allclose(dynamic(x), static(x), rtol=1e-5, atol=1e-6)


def test_torch_tensors_of_any_batch_round_trip(model, dynamic):
    for batch in (2, 33):
        x = _x(batch)
        out = dynamic(x)
        assert isinstance(out, torch.Tensor) and out.shape == (batch, 10)
        with torch.no_grad():
            assert_close(out.numpy(), model(x).numpy(), what=f"torch in/out at batch {batch}")
