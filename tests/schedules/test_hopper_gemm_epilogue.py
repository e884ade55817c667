"""The Hopper GEMM's epilogue (ember.schedules.gpu.hopper_gemm): the branch-free fp32 erf that replaces CUDA's
``erff`` in a GELU epilogue, checked numerically on the CPU (the same TVMScript lets, vectorized as in the kernel),
and what it does to MiniLM's FFN-up kernel (reshape + fp16 erf-GELU after the matmul, as FuseTIR hands it over).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import te

from ember.schedules.gpu.hopper_gemm import (ERF_BIG, ERF_CLAMP, ERF_SMALL, ERF_SPLIT, HopperGemm, _erf_lets,
                                             erf_f32_lets)

from test_gpu_rules import H100, compile_cuda, device_source

N = 1 << 16


def _erf_kernel(lanes: int):
    """B[i] = erf(A[i]) through :func:`erf_f32_lets`, inside a ``T.vectorized(lanes)`` loop like the kernel's."""
    from tvm.script import from_source
    from tvm.script import tirx as T

    lets, out = erf_f32_lets("A[i * %d + e]" % lanes, "0")
    body = "\n".join("            " + ln for ln in lets)
    src = f"""
@T.prim_func(s_tir=True)
def main(A: T.Buffer(({N},), "float32"), B: T.Buffer(({N},), "float32")):
    T.func_attr({{"tirx.noalias": True}})
    for i in range({N // lanes}):
        for e in T.vectorized({lanes}):
{body}
            B[i * {lanes} + e] = {out}
"""
    return from_source(src, extra_vars={"T": T})


def _ulps(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    ref = np.array([math.erf(float(v)) for v in x])
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / ulp


@pytest.mark.parametrize("lanes", [1, 2, 4])
def test_erf_polynomial_is_within_about_one_ulp_of_erf(lanes):
    lib = tvm.compile(tvm.IRModule({"main": _erf_kernel(lanes)}), tvm.target.Target({"kind": "llvm"}))
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-6, 6, N // 2), rng.standard_normal(N // 4) * 2,
                        np.float32(10.0) ** np.linspace(-30, 0.6, N // 4)]).astype(np.float32)
    x[:4] = [0.0, ERF_SPLIT, -ERF_SPLIT, np.nextafter(np.float32(ERF_SPLIT), np.float32(0))]
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(N, np.float32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), out)
    got = out.numpy()
    err = _ulps(got, x)
    # 1.04 ulp with an exact exp2 (the fit); LLVM's exp2 may add a little. CUDA's erff: 2 ulp documented.
    assert err.max() <= 2.0, (err.max(), x[err.argmax()])
    assert err.mean() < 0.3
    assert np.all(np.abs(got) <= 1.0) and np.all(np.sign(got[x != 0]) == np.sign(x[x != 0]))


def test_erf_polynomial_special_values():
    lib = tvm.compile(tvm.IRModule({"main": _erf_kernel(2)}), tvm.target.Target({"kind": "llvm"}))
    x = np.zeros(N, np.float32)
    x[:6] = [np.inf, -np.inf, np.nan, 100.0, -ERF_CLAMP, 1e-30]
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(N, np.float32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), out)
    got = out.numpy()[:6]
    assert got[0] == 1 and got[1] == -1 and np.isnan(got[2]) and got[3] == 1
    assert got[4] == np.float32(math.erf(-ERF_CLAMP))  # rounds to -1 in fp32: the clamp loses nothing
    assert abs(got[5] - np.float32(math.erf(1e-30))) <= np.spacing(np.float32(1e-30))  # tiny x: 2x/sqrt(pi)


def test_erf_coefficients_are_fp32_values():
    # the fit was rounded to fp32: TVMScript's T.float32(c) must be exact, or the checked numbers drift
    for c in ERF_SMALL + ERF_BIG + (ERF_SPLIT, ERF_CLAMP):
        assert float(np.float32(c)) == c


def test_only_fp32_erf_arguments_are_rewritten():
    lets, rhs = _erf_lets('a[EPC] * T.erf(T.Cast("float32", EPV * T.float16(0.5))) + T.erf(T.Cast("float32", '
                          'EPV * T.float16(0.5)))')
    assert "T.erf" not in rhs and rhs.count("ep_r0") == 2 and len(lets) == 7  # one set of lets per argument
    lets, rhs = _erf_lets("T.erf(EPV)")  # an fp16 (or unknown) argument: left to CUDA's erf
    assert lets == [] and rhs == "T.erf(EPV)"


def ffn_up_gelu(m=4096, n=1536, k=384, batch=32):
    """MiniLM's FFN-up kernel as ember compiles it with precision="fp16": fp32 accumulation, cast, bias, reshape
    to [batch, seq, n], then the fp16 erf-GELU of TVM's legalization (erf through an fp32 cast)."""
    x = te.placeholder((m, k), "float16", name="x")
    w = te.placeholder((k, n), "float16", name="w")
    b = te.placeholder((n,), "float16", name="b")
    r = te.reduce_axis((0, k), "k")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r))
    h = te.compute((m, n), lambda i, j: y[i, j].astype("float16") + b[j])
    r3 = te.compute((batch, m // batch, n), lambda a, s, j: h[a * (m // batch) + s, j])
    half = lambda v: tvm.tirx.const(v, "float16")  # noqa: E731
    e = te.compute((batch, m // batch, n), lambda a, s, j: te.erf(
        (r3[a, s, j] * half(0.70710678118654757)).astype("float32")).astype("float16"))
    o = te.compute((batch, m // batch, n), lambda a, s, j: r3[a, s, j] * (half(0.5) + e[a, s, j] * half(0.5)))
    return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")


def test_ffn_up_gelu_epilogue_is_vectorized_without_erff():
    src = device_source(compile_cuda(HopperGemm().apply(ffn_up_gelu(), H100, False)))
    assert "wgmma.mma_async" in src and "m64n192k16" in src
    assert "erff" not in src and "exp2f" in src
    # the output element pairs leave as one 4-byte store each (CUDA's erff call made TVM scalarize the pair loop)
    assert src.count("*(half2*)(") >= 48 and "for (int e_s" not in src


def test_legacy_switch_keeps_cudas_erf(monkeypatch):
    monkeypatch.setenv("EMBER_HOPPER_LEGACY", "1")
    src = device_source(compile_cuda(HopperGemm().apply(ffn_up_gelu(), H100, False)))
    assert "wgmma.mma_async" in src and "erff" in src


def test_staged_epilogue_goes_through_shared_memory_in_16_byte_rows():
    from ember.schedules.gpu.hopper_gemm import HopperConfig, with_staging

    cfg = with_staging(HopperConfig(2, 192, 4, persistent=True))
    assert cfg.staged and cfg.fits() and cfg.stages == 4
    src = device_source(compile_cuda(HopperGemm(cfg).apply(ffn_up_gelu(), H100, False)))
    body = src[src.index("__global__ void __launch_bounds__(384) main_kernel("):]
    # fragment pairs into the warpgroup's tile (generic pointer into the dynamic shared block), then 16-byte
    # copies of whole rows to the output, between two named warpgroup barriers that order memory for nvcc
    assert "half* stage_ptr = " in body and body.count("*(half2*)(stage_ptr") == 48
    assert body.count("*(uint4*)(stage_ptr") == 12 and "erff" not in body
    assert body.count("tvm_builtin_ptx_bar_sync_count_sync(") == 2 and '"memory"' in src.split("bar.sync")[1][:80]
    assert body.count("__syncthreads()") == 1  # only the barrier-init one: nothing block-wide in the epilogue
    # the ring is 4 x (128 + 192) x 64 = 81920 halves; warpgroup wg's 64 x 200 tile starts at 81920 + 12800 wg
    # (tx // 128 = wg + 1: 12800 (tx >> 7) + 69120)
    assert "* 12800) + 69120)" in body


def test_staging_falls_back_where_it_cannot_apply():
    from test_gpu_rules import matmul

    from ember.schedules.gpu.hopper_gemm import HopperConfig, with_staging

    assert with_staging(HopperConfig(2, 256, 4)).stages == 3  # 128x256: one stage fewer makes room
    assert with_staging(HopperConfig(2, 128, 6)) == HopperConfig(2, 128, 5, staged=True)  # not to the last byte
    # fp32 output: no 16-byte fp16 rows, the rule stores from the fragment
    sch = HopperGemm(HopperConfig(1, 192, 4, staged=True)).apply(matmul(4096, 384, 384, "nn", out_dtype="float32"),
                                                                 H100, False)
    assert sch is not None and "stage_ptr" not in sch.mod["main"].script()


def test_staged_epilogue_guards_partial_tiles():
    # M = 4000, N = 392: neither divides the tile. Both the staging writes (their bias read would run past b) and
    # the 16-byte copies are guarded; the H100 runs covered only whole tiles with the staged epilogue.
    from test_gpu_hopper_gemm import linear

    sch = HopperGemm().apply(linear((4000,), 392, 384), H100, False)
    lines = [ln.strip() for ln in sch.mod["main"].script().splitlines()]
    guards = [ln for ln in lines if ln.startswith("if ") and "< 4000" in ln and "< 392" in ln]
    assert len(guards) == 2
    assert "uint4" in device_source(compile_cuda(sch))
