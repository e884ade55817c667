"""N:M sparsity with int8 values (per-output-row scales): packing, the CPU kernels, and ember.compile wiring."""

import numpy as np
import pytest
import torch
import tvm

import ember
import ember.sparsity as sp
from ember.compiler.targets import resolve
from ember.errors import ConfigError
from ember.passes.sparsity.pack import dequantized, nm_mask, pack, pack_int8, quantize_rows_int8, unpack
from ember.passes.sparsity.sparse_matmul import gather_isa, sparse_matmul_func
from models import MLP


def _sparse(rows, k, n, m, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype("float32")
    return w * nm_mask(w, n, m), rng


def test_int8_packing_round_trip():
    w, _ = _sparse(37, 45, 2, 4, 0)
    w[3] = 0  # an all-zero row: scale 1, codes 0
    q, scale = quantize_rows_int8(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scale[3] == 1.0
    p = pack_int8(w, 2, 4)
    assert p.values.dtype == np.int8 and p.scales.shape == (48,) and (p.scales[37:] == 1).all()
    np.testing.assert_array_equal(unpack(p), q)  # the codes, exactly
    # per-row symmetric int8: error at most half a step of the row's scale
    assert (np.abs(dequantized(p) - w) <= scale[:, None] / 2 + 1e-7).all()
    fp32 = pack(w, 2, 4)
    assert p.nbytes < fp32.nbytes / 2.5  # 1 byte + index per kept weight instead of 4 + index


@pytest.mark.parametrize("mcpu", ["host", "haswell", None])
def test_int8_kernels_match_the_dequantized_dense(mcpu):
    """AVX-512 gather (host), AVX2 gather (haswell), TVM's scalar-gather schedule (generic x86 / ARM)."""
    if mcpu == "host":
        tgt = resolve("host")[1]
    else:
        tgt = tvm.target.Target({"kind": "llvm", "num-cores": 2, **({"mcpu": mcpu} if mcpu else {})})
        if mcpu == "haswell" and gather_isa(resolve("host")[1], "float32") is None:
            pytest.skip("this CPU has no AVX2 to run the AVX2 kernel on")
    for rows, k, n, m, batch in [(64, 128, 1, 16, 1), (37, 45, 2, 4, 3), (24, 99, 3, 32, 2), (130, 70, 1, 16, 2)]:
        w, rng = _sparse(rows, k, n, m, rows + k)
        x = rng.standard_normal((batch, k)).astype("float32")
        p = pack_int8(w, n, m)
        func = sparse_matmul_func(batch, k, rows, n, m, "float32", tgt, int8=True)
        with tgt:
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.full((batch, rows), np.nan, "float32"), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in (x, p.values, p.indices, p.scales)], out)
        ref = x.astype(np.float64) @ dequantized(p).T.astype(np.float64)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_int8_values_are_refused_on_gpu_kernels():
    with pytest.raises(ConfigError, match="CPU"):
        sparse_matmul_func(1, 64, 16, 1, 16, "float32", resolve("cuda-sm90")[1], int8=True)


@pytest.mark.parametrize("quant", ["Int8Dynamic", "WeightOnly8"])
def test_compile_sparse_plus_int8(quant):
    torch.manual_seed(0)
    model = MLP(64, 96, 10).eval()
    sp.prune_nm(model, 1, 16)
    x = torch.randn(3, 64)
    q = ember.Int8Dynamic() if quant == "Int8Dynamic" else ember.WeightOnly(bits=8, group_size=-1)
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16), quantization=q)
    rep = cm.manifest["compression"]["sparsity"]
    assert rep["values"].startswith("int8") and rep["kernel"].endswith("int8 values")
    fp32 = ember.compile(model, (x,), sparsity=ember.NM(1, 16)).manifest["compression"]["sparsity"]
    assert rep["packed_bytes"] < fp32["packed_bytes"] / 1.8  # (tiny layers: the row scales weigh in)
    # the torch model with each linear weight replaced by its int8 dequantized twin
    twin = MLP(64, 96, 10).eval()
    twin.load_state_dict(model.state_dict())
    for lin in (twin.fc1, twin.fc2, twin.fc3):
        qw, scale = quantize_rows_int8(lin.weight.detach().numpy())
        lin.weight.data = torch.from_numpy(qw.astype(np.float32) * scale[:, None])
    out = cm(x.numpy())
    np.testing.assert_allclose(out, twin(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(out - model(x).detach().numpy()).max() < 0.02 * np.abs(out).max()


def test_four_bit_keeps_float_sparse_values_and_says_so():
    torch.manual_seed(1)
    model = MLP(64, 96, 10).eval()
    sp.prune_nm(model, 1, 16)
    x = torch.randn(2, 64)
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16), quantization=ember.WeightOnly(bits=4, group_size=32))
    rep = cm.manifest["compression"]["sparsity"]
    assert rep["values"] == "float" and "keep float values" in rep["note"]
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
