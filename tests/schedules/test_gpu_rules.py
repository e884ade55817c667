"""ember's GPU rules (ember.schedules.gpu): which kernels each claims, and that what it makes compiles for an H100.

CI has no GPU: here every claimed kernel is compiled to real sm_90a device code (nvcc, ahead of time; see
ember/compiler/cuda_aot.py). The numerics of the same kernels against numpy run on a GPU machine (marked ``gpu``)
and in benchmarks/gpu_bench.py, which checks every kernel it times against torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from ember.compiler.cuda_aot import cuda_build_environment
from ember.schedules import gpu_rules
from ember.schedules.gpu import GEMV, TensorCoreMatmul
from ember.schedules.gpu.common import sm_version

H100 = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})


def matmul(m, n, k, layout="nt", dtype="float16", out_dtype=None):
    """y[m, n] = sum_k x[m, k] * w (w is [n, k] for "nt", nn.Linear's layout, or [k, n] for "nn")."""
    out_dtype = out_dtype or dtype
    x = te.placeholder((m, k), dtype, name="x")
    w = te.placeholder((n, k) if layout == "nt" else (k, n), dtype, name="w")
    r = te.reduce_axis((0, k), "k")

    def body(i, j):
        wv = w[j, r] if layout == "nt" else w[r, j]
        return te.sum(x[i, r].astype(out_dtype) * wv.astype(out_dtype), axis=r)

    y = te.compute((m, n), body, name="y")
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")


def batched_matmul(b, m, n, k):
    x = te.placeholder((b, m, k), "float16", name="x")
    w = te.placeholder((b, k, n), "float16", name="w")
    r = te.reduce_axis((0, k), "k")
    y = te.compute((b, m, n), lambda s, i, j: te.sum(x[s, i, r] * w[s, r, j], axis=r), name="y")
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")


def compile_cuda(sch):
    mod = tvm.IRModule({"main": sch.mod["main"]})
    with cuda_build_environment(H100, "cuda-sm90"), H100:
        lib = tvm.compile(mod, H100)
    return lib


def device_source(lib) -> str:
    mods = [lib.mod] if hasattr(lib, "mod") else [lib]
    for m in mods:
        for imp in m.imports:
            if imp.kind == "cuda":
                return imp.inspect_source()
    raise AssertionError("no CUDA module in the compiled library")


def test_sm_version_reads_arch_suffixes():
    assert sm_version(H100) == 90
    assert sm_version(tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) == 80
    assert sm_version(tvm.target.Target({"kind": "cuda", "arch": "sm_89"})) == 89


@pytest.mark.parametrize("m,n,k,layout", [(1, 512, 1024, "nt"), (4, 384, 1536, "nt"), (1, 512, 1024, "nn"),
                                          (8, 1024, 384, "nn")])
def test_gemv_claims_decode_shapes_and_compiles(m, n, k, layout):
    sch = GEMV().apply(matmul(m, n, k, layout), H100, False)
    assert sch is not None
    lib = compile_cuda(sch)
    src = device_source(lib)
    # 128-bit weight loads (8 fp16 per thread and instruction), and the lanes' partial sums meet by shuffles
    # (inner reduction) or in shared memory (outer reduction).
    assert "uint4" in src
    assert ("__shfl_down_sync" in src) if layout == "nt" else ("__shared__" in src)


def test_gemv_fp32_accumulation_is_kept():
    sch = GEMV().apply(matmul(1, 256, 512, "nt", out_dtype="float32"), H100, False)
    assert sch is not None
    src = device_source(compile_cuda(sch))
    assert "float y_rf_local" in src or "float red_buf" in src


@pytest.mark.parametrize("func", [
    matmul(16, 512, 512),                  # 16 activation rows: a GEMM, not a GEMV
    batched_matmul(4, 1, 64, 64),          # both operands share the batch iterator
])
def test_gemv_declines_what_is_not_a_gemv(func):
    assert GEMV().apply(func, H100, False) is None


def test_gemv_declines_cpu_targets():
    assert GEMV().apply(matmul(1, 256, 256), tvm.target.Target({"kind": "llvm"}), False) is None


@pytest.mark.slow
def test_tensor_core_matmul_compiles_to_wmma_for_sm90a():
    sch = TensorCoreMatmul().apply(matmul(256, 256, 256, "nt", out_dtype="float16"), H100, False)
    assert sch is not None
    src = device_source(compile_cuda(sch))
    assert "wmma::mma_sync" in src


@pytest.mark.parametrize("func,target", [
    (matmul(256, 256, 256, dtype="float32"), H100),                                 # fp32: no fp16 tensor cores
    (matmul(1, 4096, 4096), H100),                                                  # decode shape: GEMV's
    (matmul(256, 256, 256), tvm.target.Target({"kind": "cuda", "arch": "sm_61"})),  # no tensor cores
    (matmul(256, 256, 256), tvm.target.Target({"kind": "metal"})),
])
def test_tensor_core_matmul_declines(func, target):
    assert TensorCoreMatmul().apply(func, target, False) is None


def test_gpu_rules_put_embers_rules_first():
    rules = gpu_rules()
    # (rules[1] is the Hopper wgmma GEMM, sm_90a only: tests/schedules/test_gpu_hopper_gemm.py)
    assert isinstance(rules[0], GEMV) and isinstance(rules[2], TensorCoreMatmul)


# ---- on a GPU (marked gpu): the scheduled kernels against numpy -------------------------------------------------
def _cuda_or_skip():
    from ember.runtime.load import _load_device_runtime

    try:
        _load_device_runtime("cuda")
    except Exception:  # pylint: disable=broad-except
        pytest.skip("no CUDA runtime")
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU")
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("rule,m,n,k,layout", [
    (GEMV, 1, 4096, 4096, "nt"), (GEMV, 4, 1024, 11008, "nt"), (GEMV, 1, 4096, 4096, "nn"),
    (GEMV, 8, 2048, 384, "nn"), (TensorCoreMatmul, 512, 512, 512, "nt"), (TensorCoreMatmul, 512, 768, 384, "nn"),
])
def test_gpu_rule_numerics_on_device(rule, m, n, k, layout):
    dev = _cuda_or_skip()
    func = matmul(m, n, k, layout, out_dtype="float32")
    sch = rule().apply(func, H100, False)
    assert sch is not None
    lib = compile_cuda(sch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype("float16")
    w = rng.standard_normal((n, k) if layout == "nt" else (k, n)).astype("float16")
    ref = x.astype("float32") @ (w.astype("float32").T if layout == "nt" else w.astype("float32"))
    y = tvm.runtime.tensor(np.full((m, n), np.nan, "float32"), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
