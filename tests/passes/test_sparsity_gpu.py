"""The GPU sparse matmul kernel (ember.passes.sparsity.gpu_kernel) and its packed layout (pack_gpu).

No GPU here: the index arithmetic is checked on the CPU through the kernel's emulated twin (same TIR helpers,
serial loops instead of threads), the device code is checked structurally for CUDA, ROCm and Metal, and the one
test marked ``gpu`` runs the real kernel against torch where CUDA is present (benchmarks/sparse_gpu_bench.py does
it on the H100, with timings).
"""

import re

import numpy as np
import pytest
import tvm

from ember.compiler.targets import resolve
from ember.passes.sparsity.gpu_kernel import gpu_kernel, lanes_for
from ember.passes.sparsity.pack import BLOCK, gpu_vector, nm_mask, pack_gpu, unpack
from ember.passes.sparsity.sparse_matmul import sparse_matmul_func

# rows not a multiple of 16 (guarded store), group counts not a multiple of the vector (guarded gather), partial
# last groups, 8-bit indices (m > 16), more chunks than one unrolled step (the 2752-wide one), n > 1
SIZES = [(64, 128, 1, 16, 1, "float32"), (37, 45, 2, 4, 3, "float32"), (40, 100, 1, 16, 5, "float16"),
         (24, 99, 3, 32, 2, "float32"), (130, 70, 2, 5, 1, "float16"), (48, 2752, 1, 16, 2, "float16"),
         (16, 300, 2, 4, 1, "float16")]


def _case(rows, k, n, m, batch, dtype, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(dtype)
    w *= nm_mask(w, n, m)
    x = rng.standard_normal((batch, k)).astype(dtype)
    return w, x


@pytest.mark.parametrize("rows,k,n,m,batch,dtype", SIZES)
def test_pack_gpu_round_trip_and_layout(rows, k, n, m, batch, dtype):
    w, _ = _case(rows, k, n, m, batch, dtype, seed=rows * k)
    p = pack_gpu(w, n, m)
    v = gpu_vector(dtype)
    groups = -(-k // m)
    assert p.layout == "groups" and p.values.dtype == np.dtype(dtype)
    assert p.values.shape == (-(-rows // BLOCK), -(-groups // v), n, BLOCK, v)
    assert p.indices.shape == p.values.shape[:-1] + ((v // 2) if m <= 16 else v,)
    np.testing.assert_array_equal(unpack(p), w)


@pytest.mark.parametrize("rows,k,n,m,batch,dtype,max_threads",
                         [s + (256,) for s in SIZES] + [(48, 2752, 1, 16, 2, "float16", 1024),
                                                         (16, 1300, 2, 4, 1, "float16", 1024)])
def test_emulated_kernel_matches_dense(rows, k, n, m, batch, dtype, max_threads):
    """max_threads 256 is ROCm's and Metal's block limit (16 lanes), 1024 CUDA's (up to 64 lanes)."""
    w, x = _case(rows, k, n, m, batch, dtype, seed=rows + k)
    p = pack_gpu(w, n, m)
    tgt = resolve("host")[1]
    with tgt:
        lib = tvm.compile(tvm.IRModule({"main": gpu_kernel(k, rows, n, m, dtype, emulate=True, max_threads=max_threads)
                                        .with_attr("global_symbol", "main")}), tgt)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((batch, rows), np.nan, dtype), dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in (x, p.values, p.indices)], out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    # fp32 accumulation; fp16 adds the rounding of the stored output (2^-11 relative)
    tol = 1e-5 if dtype == "float32" else 1e-3
    np.testing.assert_allclose(out.numpy(), ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


def test_cuda_source_has_vector_loads_and_one_barrier():
    from ember.compiler import cuda_aot

    if cuda_aot.find_nvcc() is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: CUDA cannot be compiled here")
    name, tgt = resolve("cuda-sm90")
    func = sparse_matmul_func(tvm.tirx.Var("batch", "int64"), 11008, 4096, 1, 16, "float16", tgt)
    with cuda_aot.cuda_build_environment(tgt, name):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    src = lib.mod.imports[0].inspect_source()
    body = src[src.index("main_kernel(uchar"):]
    lanes = lanes_for(11008 // 16 // 8, 1024)  # 86 chunks of 8 groups per row block: 32 lanes, 3 chunks each
    assert lanes == 32
    # 16-byte loads of 8 fp16 values, 4-byte loads of 8 nibbles; all chunks of a thread loaded up front
    assert body.count("*(uint4*)(values_ptr") == 3 and body.count("*(uint*)(indices_ptr") == 3
    assert body.count("__syncthreads()") == 1 and f"__launch_bounds__({16 * lanes})" in src
    assert "__shared__" in body and "shfl" not in body  # the reduction goes through shared memory


def test_rocm_and_metal_compile_the_kernel(tmp_path):
    """The same TIR for wave-64 ROCm (code object) and Metal (MSL without device-memory scratch)."""
    import torch

    import ember
    import ember.sparsity as sp
    from ember.compiler import metal, rocm_aot
    from ember.compiler.cross import find_ld64
    from models import MLP

    torch.manual_seed(0)
    model = MLP(64, 96, 10).eval()
    sp.prune_nm(model, 1, 16)
    x = torch.randn(2, 64)
    ran = 0
    if rocm_aot.find_bitcode_dir() is not None and rocm_aot.find_lld():
        art = ember.compile(model, (x,), target="rocm-gfx942", sparsity=ember.NM(1, 16)).export(tmp_path / "r")
        kernels = [f for co in rocm_aot.inspect_code_objects(f"{art}/model.so") for f in co.functions]
        assert sum("ember_sparse_matmul" in f for f in kernels) == 3, kernels
        ran += 1
    if find_ld64() is not None:
        cm = ember.compile(model, (x,), target="metal", sparsity=ember.NM(1, 16))
        assert cm.manifest["compression"]["sparsity"]["kernel"] == "gpu (metal)"
        mc = metal.inspect_metal(f"{cm.export(tmp_path / 'm')}/model.so")
        assert metal.msl_problems(mc) == []
        src = "\n".join(s for s in mc.sources.values() if "ember_sparse_matmul" in s)
        assert len(re.findall(r"kernel\s+void\s+ember_sparse_matmul", src)) == 3
        assert "threadgroup float" in src and "threadgroup_barrier" in src
        ran += 1
    if not ran:
        pytest.skip("neither the ROCm device libraries nor ld64.lld are installed (make sysdeps)")


@pytest.mark.gpu
def test_cuda_kernel_matches_torch_on_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from ember.compiler import cuda_aot

    name, tgt = resolve("cuda-sm90")
    for rows, k, n, m, batch, dtype in SIZES:
        w, x = _case(rows, k, n, m, batch, dtype, seed=1)
        p = pack_gpu(w, n, m)
        func = sparse_matmul_func(tvm.tirx.Var("batch", "int64"), k, rows, n, m, dtype, tgt)
        with cuda_aot.cuda_build_environment(tgt, name):
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
        dev = tvm.cuda(0)
        out = tvm.runtime.tensor(np.zeros((batch, rows), dtype), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in (x, p.values, p.indices)], out)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        tol = 1e-5 if dtype == "float32" else 1e-3
        np.testing.assert_allclose(out.numpy(), ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


def test_emulated_kernel_fp16_in_fp32_out():
    """precision="fp16" makes matmul(x16, w16, out_dtype="float32"): the kernel stores its fp32 sums as they are."""
    w, x = _case(40, 160, 1, 16, 2, "float16", seed=5)
    p = pack_gpu(w, 1, 16)
    tgt = resolve("host")[1]
    func = gpu_kernel(160, 40, 1, 16, "float16", emulate=True, out_dtype="float32")
    with tgt:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((2, 40), np.nan, "float32"), dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in (x, p.values, p.indices)], out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_cuda_compile_with_fp16_precision_packs_fp16_values():
    """ember.compile(target="cuda-sm90", precision="fp16", sparsity=NM(1, 16)): the precision pass runs before
    the packing (compress), so every Linear is sparse with fp16 values (half the packed bytes of fp32)."""
    import torch

    import ember
    import ember.sparsity as sp
    from ember.compiler import cuda_aot
    from models import MLP

    if cuda_aot.find_nvcc() is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: CUDA cannot be compiled here")
    torch.manual_seed(0)
    model = MLP(256, 128, 16).eval()  # reduction sizes that fill whole vectors of 8 fp16 / 4 fp32 groups
    sp.prune_nm(model, 1, 16)
    x = torch.randn(3, 256)
    reps = {}
    for precision in ("fp16", None):
        cm = ember.compile(model, (x,), target="cuda-sm90", precision=precision, sparsity=ember.NM(1, 16))
        reps[precision] = cm.manifest["compression"]
    half, full = reps["fp16"]["sparsity"], reps[None]["sparsity"]
    assert reps["fp16"]["precision"]["precision"] == "fp16" and "precision" not in reps[None]
    assert [layer["name"] for layer in half["layers"]] == ["p_fc1_weight", "p_fc2_weight", "p_fc3_weight"]
    assert not half["skipped"] and half["kernel"] == "gpu (cuda)"
    # fp16 values: 2 bytes + half a byte of index per kept weight, against 4 + 0.5 (more groups per vector pad)
    assert half["packed_bytes"] < 0.6 * full["packed_bytes"]
