"""ember's fp16 tensor-core GEMM rule: tile choice, split-K and K-major weights (ember.schedules.gpu.tensor_core).

CI has no GPU: the schedules are compiled to sm_90a device code here and their CUDA source is checked; their
numerics against torch run on the H100 in benchmarks/gpu_bench.py (every kernel variant it times is checked) and
in the gpu-marked test below.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from tvm import te

from ember.schedules.gpu import TensorCoreMatmul
from ember.schedules.gpu.tensor_core import CONFIGS, SMS, choose_config, split_k_for

from test_gpu_rules import H100, _cuda_or_skip, compile_cuda, device_source


def linear(m, n, k):
    """ember's fp16 linear layer as FuseTIR leaves it: W stored [K, N], fp32 accumulation, cast, bias add."""
    x = te.placeholder((m, k), "float16", name="x")
    w = te.placeholder((k, n), "float16", name="w")
    b = te.placeholder((n,), "float16", name="b")
    r = te.reduce_axis((0, k), "k")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r),
                   name="y")
    h = te.compute((m, n), lambda i, j: y[i, j].astype("float16"), name="cast")
    o = te.compute((m, n), lambda i, j: h[i, j] + b[j], name="bias")
    return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")


def blocks(cfg, m, n):
    return -(-m // cfg.bm) * -(-n // cfg.bn) * cfg.split_k


def test_minilm_b1_ffn_down_is_split_to_fill_the_gpu():
    # 128 tokens x 1536 -> 384: 24 tiles of 32x64, each walking K = 1536 alone, before split-K.
    cfg = choose_config(128, 384, 1536)
    assert cfg.split_k > 1
    assert SMS // 2 < blocks(cfg, 128, 384) <= SMS
    assert (1536 // cfg.bk) % cfg.split_k == 0  # whole K tiles per slice


@pytest.mark.parametrize("m,n,k", [(128, 384, 384), (128, 1536, 384), (4096, 384, 1536), (4096, 4096, 4096)])
def test_split_k_only_where_k_is_long_and_tiles_are_few(m, n, k):
    assert choose_config(m, n, k).split_k == 1


def test_minilm_b32_projections_keep_a_full_wave():
    # 96 blocks of 128x128 (3/4 of a wave) were faster alone but made MiniLM fp16 b32 slower on the H100 (1.195 vs
    # 1.075-1.079 ms, BENCHMARKS.md): N=384 outputs take 64x64 tiles (384 blocks), N=1536 fill a wave with 128x128.
    assert choose_config(4096, 384, 384) == CONFIGS["small"]
    assert choose_config(4096, 384, 1536) == CONFIGS["small"]
    assert choose_config(4096, 1536, 384) == CONFIGS["medium"]
    assert choose_config(128, 384, 384).bm == 32


def test_split_k_for_respects_the_pipeline_depth():
    cfg = CONFIGS["tiny"]
    assert split_k_for(4, 2048, cfg) >= 2
    assert 2048 // cfg.bk // split_k_for(4, 2048, cfg) >= 4  # every slice keeps >= 4 K tiles
    assert split_k_for(100, 4096, cfg) == 1  # already most of a wave


@pytest.mark.slow
def test_split_k_only_with_fp32_accumulation():
    # An fp16 accumulator would round every slice's partial sum: such kernels keep one slice.
    te_fp16 = te.placeholder((128, 1536), "float16", name="x")
    w = te.placeholder((1536, 384), "float16", name="w")
    r = te.reduce_axis((0, 1536), "k")
    y = te.compute((128, 384), lambda i, j: te.sum(te_fp16[i, r] * w[r, j], axis=r), name="y")
    func = te.create_prim_func([te_fp16, w, y]).with_attr("global_symbol", "main")
    sch = TensorCoreMatmul().apply(func, H100, False)
    assert sch is not None
    assert "_rf" not in sch.mod.script()
    sch32 = TensorCoreMatmul().apply(linear(128, 384, 1536), H100, False)
    assert "_rf" in sch32.mod.script()


@pytest.mark.slow
def test_split_k_linear_with_kn_weights_compiles_to_two_kernels():
    # M = 100 is padded to the 32-row tile; W [K, N] keeps a K-major shared tile (row-major WMMA B fragments).
    cfg = CONFIGS["tiny"].with_split(4)
    sch = TensorCoreMatmul(cfg).apply(linear(100, 128, 1024), H100, False)
    assert sch is not None
    src = device_source(compile_cuda(sch))
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", src))
    assert len(kernels) == 2, kernels  # the tensor-core slices, then the sum + epilogue
    assert "wmma::mma_sync" in src
    assert "wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::row_major" in src
    assert "uint4" in src  # 16-byte operand loads (B too, now that its shared tile is K-major)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,split", [(128, 384, 1536, 4), (100, 384, 1536, 4), (128, 384, 384, 1)])
def test_split_k_linear_numerics_on_device(m, n, k, split):
    import tvm

    dev = _cuda_or_skip()
    sch = TensorCoreMatmul(CONFIGS["tiny"].with_split(split)).apply(linear(m, n, k), H100, False)
    lib = compile_cuda(sch)
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((m, k))).astype("float16")
    w = rng.standard_normal((k, n)).astype("float16")
    b = rng.standard_normal(n).astype("float16")
    ref = x.astype("float32") @ w.astype("float32") + b.astype("float32")
    out = tvm.runtime.tensor(np.full((m, n), np.nan, "float16"), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), tvm.runtime.tensor(b, dev), out)
    np.testing.assert_allclose(out.numpy().astype("float32"), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
