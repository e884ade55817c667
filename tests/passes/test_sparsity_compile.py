"""ember.compile(..., sparsity=ember.NM(n, m)): the rewrite, the artifact and the numbers end to end."""

import json
import os

import numpy as np
import pytest
import torch

import ember
import ember.sparsity as sp
from conftest import assert_close
from ember.config import parse_sparsity
from ember.errors import ConfigError
from models import MLP, TinyTransformer


def _masked_mlp(n, m, seed=0):
    torch.manual_seed(seed)
    model = MLP(64, 96, 10).eval()
    sp.prune_nm(model, n, m)
    return model


@pytest.mark.slow
def test_mlp_1_16_matches_masked_torch_and_stores_only_packed(tmp_path):
    model = _masked_mlp(1, 16)
    x = torch.randn(3, 64)
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16))
    assert_close(cm(x).numpy(), model(x).detach().numpy())
    rep = cm.manifest["compression"]["sparsity"]
    assert rep["scheme"] == "1:16" and not rep["warnings"] and not rep["skipped"]
    assert [layer["name"] for layer in rep["layers"]] == ["p_fc1_weight", "p_fc2_weight", "p_fc3_weight"]
    for layer in rep["layers"]:
        assert layer["was_nm_sparse"] and layer["sparsity"] >= 15 / 16 - 1e-6
        assert layer["packed_bytes"] * 8 < layer["dense_bytes"]  # 14x at 1:16, less where rows pad to 16
    assert rep["bytes_saved"] == rep["dense_bytes"] - rep["packed_bytes"] > 0
    # the artifact holds the packed arrays, not the dense weights
    path = cm.export(str(tmp_path / "mlp"))
    loaded = ember.load(path)
    assert_close(loaded(x.numpy()), model(x).detach().numpy())
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["compression"]["sparsity"]["packed_bytes"] == rep["packed_bytes"]
    params = os.path.getsize(os.path.join(path, "params.bin"))
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert params < dense / 4, (params, dense)


def test_dynamic_batch_and_other_nm():
    model = _masked_mlp(2, 4, seed=1)
    cm = ember.compile(model, (torch.randn(2, 64),), sparsity=ember.NM(2, 4), dynamic_batch=True)
    for b in (1, 5):
        x = torch.randn(b, 64)
        assert_close(cm(x).numpy(), model(x).detach().numpy())


def test_dense_weights_are_pruned_with_a_warning():
    torch.manual_seed(2)
    model = MLP(64, 96, 10).eval()
    x = torch.randn(4, 64)
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 8))
    rep = cm.manifest["compression"]["sparsity"]
    assert len(rep["warnings"]) == 3 and "pruned it by magnitude" in rep["warnings"][0]
    assert all(not layer["was_nm_sparse"] for layer in rep["layers"])
    sp.prune_nm(model, 1, 8)  # the same magnitude rule on the torch side
    assert_close(cm(x).numpy(), model(x).detach().numpy())


@pytest.mark.slow
def test_transformer_linears_on_3d_inputs():
    """Linear layers on [batch, seq, d] inputs (reshaped around the kernel); attention matmuls stay dense."""
    torch.manual_seed(3)
    model = TinyTransformer().eval()
    sp.prune_nm(model, 2, 4)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    cm = ember.compile(model, (ids, mask), sparsity=ember.NM(2, 4))
    rep = cm.manifest["compression"]["sparsity"]
    assert len(rep["layers"]) >= 8 and not rep["warnings"]
    assert_close(cm(ids, mask).numpy(), model(ids, mask).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_config_and_cli_spelling():
    assert parse_sparsity("1:16") == ember.NM(1, 16)
    assert parse_sparsity(None) is None
    for bad in ("16", "1:1", "a:b", "0:4"):
        with pytest.raises(ConfigError):
            parse_sparsity(bad)
    with pytest.raises(ConfigError, match="ember.NM"):
        ember.compile(MLP(), (torch.randn(1, 32),), sparsity="1:16")


def test_cli_compile_with_sparsity(tmp_path):
    from ember.cli import main

    model = _masked_mlp(1, 16, seed=4)
    x = torch.randn(2, 64)
    pt2 = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(pt2))
    out = tmp_path / "art"
    assert main(["compile", str(pt2), "-o", str(out), "--sparsity", "1:16"]) in (0, None)
    loaded = ember.load(str(out))
    assert loaded.manifest["compression"]["sparsity"]["scheme"] == "1:16"
    assert_close(loaded(x.numpy()), model(x).detach().numpy())


def test_onnx_gemm_weights_are_packed(tmp_path):
    """ONNX Gemm/MatMul initializers take the same path as torch Linear weights."""
    import warnings

    model = _masked_mlp(2, 8, seed=5)
    x = torch.randn(3, 64)
    path = str(tmp_path / "mlp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False)
    cm = ember.compile(path, sparsity=ember.NM(2, 8))
    rep = cm.manifest["compression"]["sparsity"]
    assert len(rep["layers"]) == 3 and not rep["warnings"]
    assert_close(cm(x.numpy()), model(x).detach().numpy())
