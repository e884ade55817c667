"""ember's sparse matmul kernels equal a dense matmul on the masked weights (random sizes, N:M, batch)."""

import numpy as np
import pytest
import tvm

from ember.compiler.targets import resolve
from ember.passes.sparsity.pack import nm_mask, pack
from ember.passes.sparsity.sparse_matmul import gather_isa, sparse_matmul_func


def _host():
    return resolve("host")[1]


def _run(func, target, x, p):
    with target:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, p.values, p.indices)]
    out = tvm.runtime.tensor(np.full((x.shape[0], p.shape[0]), np.nan, "float32"), dev)
    lib(*args, out)
    return out.numpy()


def _case(rows, k, n, m, batch, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype("float32")
    w *= nm_mask(w, n, m)
    x = rng.standard_normal((batch, k)).astype("float32")
    return w, x, pack(w, n, m)


def _check(out, x, w):
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


# rows not a multiple of the vector width (tail), odd group counts, partial last groups, 8-bit indices (m > 16)
SIZES = [(64, 128, 1, 16, 1), (37, 45, 2, 4, 3), (40, 100, 1, 16, 5), (24, 99, 3, 32, 2), (16, 48, 1, 8, 7),
         (130, 70, 2, 5, 1)]


@pytest.mark.parametrize("rows,k,n,m,batch", SIZES)
def test_host_kernel_matches_dense(rows, k, n, m, batch):
    w, x, p = _case(rows, k, n, m, batch, seed=rows + k + m)
    tgt = _host()
    _check(_run(sparse_matmul_func(batch, k, rows, n, m, "float32", tgt), tgt, x, p), x, w)


@pytest.mark.parametrize("mcpu", [None, "haswell"])
def test_generic_and_avx2_kernels(mcpu):
    """No-gather CPUs (generic x86-64, ARM) get the TVM-scheduled kernel; AVX2 CPUs the 8-lane gather."""
    host_isa = gather_isa(_host(), "float32")
    if mcpu == "haswell" and host_isa is None:
        pytest.skip("this CPU has no AVX2 to run the AVX2 kernel on")
    attrs = {"kind": "llvm", "num-cores": 2, **({"mcpu": mcpu} if mcpu else {})}
    tgt = tvm.target.Target(attrs)
    assert gather_isa(tgt, "float32") == ("avx2" if mcpu else None)
    for rows, k, n, m, batch in [(37, 45, 2, 4, 3), (24, 99, 3, 32, 2), (40, 100, 1, 16, 5)]:
        w, x, p = _case(rows, k, n, m, batch, seed=3)
        _check(_run(sparse_matmul_func(batch, k, rows, n, m, "float32", tgt), tgt, x, p), x, w)


def test_one_kernel_serves_every_batch():
    tgt = _host()
    batch = tvm.tirx.Var("batch", "int64")
    func = sparse_matmul_func(batch, 96, 48, 1, 16, "float32", tgt)
    with tgt:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype("float32")
    w *= nm_mask(w, 1, 16)
    p = pack(w, 1, 16)
    dev = tvm.cpu()
    for b in (1, 3, 8):
        x = rng.standard_normal((b, 96)).astype("float32")
        out = tvm.runtime.tensor(np.zeros((b, 48), "float32"), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in (x, p.values, p.indices)], out)
        _check(out.numpy(), x, w)


def test_cuda_kernel_compiles_for_sm90():
    """The CUDA variant (thread bindings) compiles to sm_90a device code without a GPU (nvcc only)."""
    from ember.compiler import cuda_aot

    if cuda_aot.find_nvcc() is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: CUDA cannot be compiled here")
    name, tgt = resolve("cuda-sm90")
    func = sparse_matmul_func(tvm.tirx.Var("batch", "int64"), 4096, 256, 1, 16, "float32", tgt)
    with cuda_aot.cuda_build_environment(tgt, name):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    src = lib.mod.imports[0].inspect_source()
    assert "threadIdx.x" in src and "blockIdx.y" in src
    # reads the packed bytes (uchar indices) and gathers x: no dense weight anywhere
    assert "uchar* __restrict__ indices" in src
