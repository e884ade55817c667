"""precision="fp16" (ember.passes.precision): the graph is rewritten to half precision, and still computes the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ember
from ember.compiler.build import import_model
from ember.errors import ConfigError
from ember.passes.precision import apply_precision, normalize_precision
from models import MLP, TinyTransformer, seeded


def _dtypes(func):
    return [str(v.ty.dtype) for v in func.params]


def test_normalize_precision_names():
    assert normalize_precision(None) == "fp32"
    assert normalize_precision("float16") == "fp16"
    assert normalize_precision("half") == "fp16"
    with pytest.raises(ConfigError, match="bf16 is not supported"):
        normalize_precision("bf16")
    with pytest.raises(ConfigError, match="use one of fp32, fp16"):
        normalize_precision("int3")


def test_fp16_rewrites_weights_and_matmuls_but_not_the_signature():
    model = seeded(MLP)
    x = torch.randn(4, 32)
    imported = import_model(model, (x,))
    before_ret = imported.mod["main"].ret_ty
    n_in = len(imported.inputs)
    imported, report = apply_precision(imported, "fp16")
    main = imported.mod["main"]
    dtypes = _dtypes(main)
    assert dtypes[:n_in] == ["float32"]                     # the caller's input dtype is kept
    assert set(dtypes[n_in:]) == {"float16"}                # every fp32 weight became fp16...
    assert all(p.dtype == np.float16 for p in imported.params)  # ...and so did the arrays that feed them
    assert report == {"precision": "fp16", "accumulate": "float32", "fp16_weights": len(imported.params),
                      "weights": len(imported.params)}
    text = main.script()
    assert 'R.matmul(' in text and 'out_dtype="float32"' in text  # fp16 operands, fp32 accumulation
    import tvm_ffi

    assert tvm_ffi.structural_equal(main.ret_ty, before_ret)


def test_fp32_is_the_identity():
    model = seeded(MLP)
    imported = import_model(model, (torch.randn(2, 32),))
    mod = imported.mod
    out, report = apply_precision(imported, "fp32")
    assert report is None and out.mod is mod


@pytest.mark.slow
def test_fp16_transformer_matches_torch_within_half_precision():
    model = seeded(TinyTransformer)
    g = torch.Generator().manual_seed(1)
    args = (torch.randint(0, 100, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.int64))
    cm = ember.compile(model, args, precision="fp16")
    assert cm.manifest["compression"]["precision"]["precision"] == "fp16"
    ours = np.asarray(cm(*[a.numpy() for a in args]))
    with torch.no_grad():
        ref = model(*args).numpy()
    assert ours.dtype == np.float32  # outputs keep the model's dtype
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    # Half precision: ~1e-3 relative per op; a 2-layer transformer stays well inside 2e-2 of the output scale.
    assert err <= 2e-2 * scale, (err, scale)
    # ...and it really computed in half precision (an fp32 graph would agree to ~1e-6).
    assert err > 1e-6 * scale


@pytest.mark.slow
def test_fp16_with_a_dynamic_batch_compiles_and_matches_torch():
    """TVM's ToMixedPrecision fails on named fp16 weights when shapes are symbolic; ember then lets the graph cast
    the weights (lifted to compile time) — one artifact serves every batch size."""
    model = seeded(MLP)
    cm = ember.compile(model, (torch.randn(2, 32),), precision="fp16", dynamic_batch=True)
    assert cm.manifest["compression"]["precision"].get("weights_cast_at_compile_time") is True
    for batch in (1, 5):
        x = torch.randn(batch, 32)
        with torch.no_grad():
            ref = model(x).numpy()
        ours = np.asarray(cm(x.numpy()))
        assert ours.shape == ref.shape
        scale = np.abs(ref).max()
        assert 1e-6 * scale < np.abs(ours - ref).max() <= 2e-2 * scale  # half precision, really
