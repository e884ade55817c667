"""RowNorm (ember.schedules.gpu.row_norm): which kernels it claims, and that they compile for an H100 to one warp per
row with shuffle reductions (no shared memory, no __syncthreads). Numerics against numpy run on a GPU (marked
``gpu``) and through every layer norm of MiniLM in benchmarks/gpu_bench.py, which checks the model against torch."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from ember.compiler.cuda_aot import cuda_build_environment
from ember.schedules import gpu_rules
from ember.schedules.gpu.row_norm import RowNorm, rows_per_block

H100 = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
EPS = 1e-12


def add_layer_norm(shape, in_dtype="float16", out_dtype="float16", rms=False, residual_in_fp32=False,
                   two_outputs=False):
    """out = layer_norm(a + b) * g + beta (or RMS norm), a/b cast to fp32, the result cast to ``out_dtype``: the
    kernel ember's fusion makes of a residual add + layer norm under precision="fp16"."""
    *rows, c = shape
    a = te.placeholder(shape, in_dtype, name="a")
    b = te.placeholder(shape, "float32" if residual_in_fp32 else in_dtype, name="b")
    g = te.placeholder((c,), "float32", name="g")
    beta = te.placeholder((c,), "float32", name="beta")
    x = te.compute(shape, lambda *i: a(*i).astype("float32") + b(*i).astype("float32"), name="x")
    k = te.reduce_axis((0, c), "k")
    if rms:
        ss = te.compute(rows, lambda *i: te.sum(x(*i, k) * x(*i, k), axis=k), name="ss")
        y = te.compute(shape, lambda *i: x(*i) * te.rsqrt(ss(*i[:-1]) / c + EPS) * g[i[-1]], name="y")
    else:
        s = te.compute(rows, lambda *i: te.sum(x(*i, k), axis=k), name="s")
        k2 = te.reduce_axis((0, c), "k2")
        v = te.compute(rows, lambda *i: te.sum((x(*i, k2) - s(*i) / c) * (x(*i, k2) - s(*i) / c), axis=k2),
                       name="v")
        y = te.compute(shape, lambda *i: (x(*i) - s(*i[:-1]) / c) * te.rsqrt(v(*i[:-1]) / c + EPS) * g[i[-1]]
                       + beta[i[-1]], name="y")
    out = te.compute(shape, lambda *i: y(*i).astype(out_dtype), name="out")
    params = [a, b, g] + ([] if rms else [beta]) + [out] + ([y] if two_outputs else [])
    return te.create_prim_func(params).with_attr("global_symbol", "main")


def reference(args, rms=False):
    a, b, g = (x.astype(np.float64) for x in args[:3])
    x = a + b
    if rms:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * g
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS) * g + args[3].astype(np.float64)


def compile_cuda(func):
    sch = RowNorm().apply(func, H100, False)
    assert sch is not None, "RowNorm declined an add + layer norm kernel"
    with cuda_build_environment(H100, "cuda-sm90"), H100:
        return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), H100)


def device_source(lib) -> str:
    for imp in (lib.mod if hasattr(lib, "mod") else lib).imports:
        if imp.kind == "cuda":
            return imp.inspect_source()
    raise AssertionError("no CUDA module in the compiled library")


def test_rows_per_block_keeps_two_blocks_per_sm():
    assert rows_per_block(128) == 1       # MiniLM batch 1: 128 rows -> 128 blocks of one warp
    assert rows_per_block(4096) == 8      # batch 32: 512 blocks of 8 warps
    assert rows_per_block(1056) == 4
    assert rows_per_block(None) == 4


CASES = [((32, 128, 384), False, False), ((7, 100), False, False), ((5, 384), True, False),
         ((32, 128, 384), False, True)]  # two outputs: fp16 for the matmuls, fp32 for the residual


@pytest.mark.parametrize("shape,rms,two", CASES)
def test_claims_norms_and_compiles_to_warp_shuffles(shape, rms, two):
    src = device_source(compile_cuda(add_layer_norm(shape, rms=rms, residual_in_fp32=two, two_outputs=two)))
    # one warp per row: statistics by warp shuffles, in registers; no block-wide reduction
    assert "__shfl_down_sync" in src
    assert "__syncthreads" not in src and "__shared__" not in src
    assert "__launch_bounds__(32)" in src or "threadIdx.y" in src


def test_is_tried_before_dlight_for_cuda():
    names = [type(r).__name__ for r in gpu_rules()]
    assert names.index("RowNorm") < names.index("GeneralReduction")


def test_declines_other_kernels():
    x = te.placeholder((64, 256), "float16", name="x")
    w = te.placeholder((256, 128), "float16", name="w")
    k = te.reduce_axis((0, 256), "k")
    mm = te.compute((64, 128), lambda i, j: te.sum(x[i, k].astype("float32") * w[k, j].astype("float32"), axis=k))
    assert RowNorm().apply(te.create_prim_func([x, w, mm]), H100, False) is None
    k2 = te.reduce_axis((0, 256), "k2")
    row_sum = te.compute((64,), lambda i: te.sum(x[i, k2].astype("float32"), axis=k2))  # no per-row output
    assert RowNorm().apply(te.create_prim_func([x, row_sum]), H100, False) is None
    llvm = tvm.target.Target({"kind": "llvm"})
    assert RowNorm().apply(add_layer_norm((8, 384)), llvm, False) is None


@pytest.mark.gpu
@pytest.mark.parametrize("shape,rms,two", CASES)
def test_matches_numpy_on_gpu(shape, rms, two):
    pytest.importorskip("torch")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    func = add_layer_norm(shape, rms=rms, residual_in_fp32=two, two_outputs=two)
    lib = compile_cuda(func)
    rng = np.random.default_rng(0)
    args = [(rng.standard_normal(shape) * 2).astype(np.float16),
            rng.standard_normal(shape).astype(np.float32 if two else np.float16),
            (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)]
    if not rms:
        args.append((0.1 * rng.standard_normal(shape[-1])).astype(np.float32))
    dev = tvm.cuda(0)
    outs = [tvm.runtime.tensor(np.full(shape, np.nan, np.float16), dev)]
    if two:
        outs.append(tvm.runtime.tensor(np.full(shape, np.nan, np.float32), dev))
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], *outs)
    ref = reference(args, rms)
    np.testing.assert_allclose(outs[0].numpy().astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    if two:
        np.testing.assert_allclose(outs[1].numpy(), ref, rtol=1e-5, atol=1e-5)
