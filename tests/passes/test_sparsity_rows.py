"""The many-rows sparse matmul (ember.passes.sparsity.rows_kernel): vectors along x's rows, no gather."""

import numpy as np
import pytest
import torch
import tvm

import ember
import ember.sparsity as sp
from ember.compiler.targets import resolve
from ember.passes.sparsity.pack import dequantized, nm_mask, pack, pack_int8
from ember.passes.sparsity.rows_kernel import rows_kernel
from ember.passes.sparsity.sparse_matmul import gather_isa


def _isa_targets():
    host = resolve("host")[1]
    isa = gather_isa(host, "float32")
    if isa is None:
        pytest.skip("this CPU has no AVX2/AVX-512: the rows kernel is x86-only")
    out = [(isa, host)]
    if isa == "avx512":
        out.append(("avx2", tvm.target.Target({"kind": "llvm", "num-cores": 2, "mcpu": "haswell"})))
    return out


# row counts: one full vector, a 1-wide tail, tails of 5 and 8; padded feature blocks; 8-bit indices; n > 1
CASES = [(64, 128, 1, 16, 16, False), (37, 45, 2, 4, 21, False), (24, 99, 3, 32, 40, True),
         (130, 70, 1, 16, 17, True), (40, 100, 1, 16, 128, False)]


@pytest.mark.parametrize("rows,k,n,m,batch,int8", CASES)
def test_rows_kernel_matches_dense(rows, k, n, m, batch, int8):
    for isa, tgt in _isa_targets():
        rng = np.random.default_rng(rows + k)
        w = rng.standard_normal((rows, k)).astype("float32")
        w *= nm_mask(w, n, m)
        x = rng.standard_normal((batch, k)).astype("float32")
        p = pack_int8(w, n, m) if int8 else pack(w, n, m)
        with tgt:
            lib = tvm.compile(tvm.IRModule({"main": rows_kernel(k, rows, n, m, batch, isa, True, int8)
                                            .with_attr("global_symbol", "main")}), tgt)
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.full((rows, batch), np.nan, "float32"), dev)
        args = [np.ascontiguousarray(x.T), p.values, p.indices] + ([p.scales] if int8 else [])
        lib(*[tvm.runtime.tensor(a, dev) for a in args], out)
        ref = x.astype(np.float64) @ dequantized(p).T.astype(np.float64)
        np.testing.assert_allclose(out.numpy().T, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=isa)


def test_compile_picks_rows_kernel_for_many_static_rows():
    _isa_targets()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    sp.prune_nm(model, 1, 16)
    x = torch.randn(3, 7, 64)  # 21 rows: a full vector of 16 and a tail of 5
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16))
    assert "row vectors" in cm.manifest["compression"]["sparsity"]["kernel"]
    kernels = [kern["name"] for kern in cm.manifest["kernels"]["ember"]["kernels"]]
    assert sum(name.startswith("ember_sparse_matmul_rows_") for name in kernels) == 2, kernels
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    # a dynamic batch leaves the row count unknown at compile time: the gather kernel serves every batch
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16), dynamic_batch=True)
    kernels = [kern["name"] for kern in cm.manifest["kernels"]["ember"]["kernels"]]
    assert not any(name.startswith("ember_sparse_matmul_rows_") for name in kernels), kernels
    x5 = torch.randn(5, 7, 64)
    np.testing.assert_allclose(cm(x5.numpy()), model(x5).detach().numpy(), rtol=1e-5, atol=1e-5)
