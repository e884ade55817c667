"""Quantization arithmetic and kernels against numpy references (random inputs, odd sizes)."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import s_tir

from ember.compiler.targets import resolve
from ember.passes.quantize import calibrate, kernels, qmath

TARGET = resolve("host")[1]
RNG = np.random.default_rng(0)


def _module(func):
    # ember's kernels are module-private (no global_symbol); standalone, expose the kernel as "main"
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _run(func, *arrays, outs):
    lib = tvm.compile(_module(func), target=TARGET)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    args += [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in outs]
    lib["main"](*args)
    return [a.numpy() for a in args[len(arrays):]]


# -- quantize / dequantize round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 16, False), (8, -1, True), (8, 8, False)])
def test_group_round_trip_matches_formula(bits, group, sym):
    w = RNG.standard_normal((64, 24)).astype(np.float32)
    q, s, z = qmath.quantize_groups(w, bits, group, sym, axis=0, search=False)
    g = 64 if group == -1 else group
    assert q.max() <= (1 << bits) - 1 and s.shape == (64 // g, 24)
    # independent reference: per group, w / scale rounded, offset by the zero point
    for gi in range(64 // g):
        blk = w[gi * g:(gi + 1) * g]
        if sym:
            scale = np.float32(np.float16(np.abs(blk).max(0) / ((1 << (bits - 1)) - 1)))
            zero = np.full(24, 1 << (bits - 1), np.float32)
        else:
            lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
            scale = np.float32(np.float16((hi - lo) / ((1 << bits) - 1)))
            zero = np.clip(np.round(-lo / scale), 0, (1 << bits) - 1)
        np.testing.assert_allclose(s[gi], scale, rtol=1e-6)
        np.testing.assert_array_equal(q[gi * g:(gi + 1) * g], np.clip(np.round(blk / scale) + zero, 0, (1 << bits) - 1))
    deq = qmath.dequantize_groups(q, s, z, group, axis=0)
    step = np.repeat(s, g, axis=0)
    # round to nearest; asymmetric: the rounded zero point shifts the range by up to half a step at the ends
    assert np.all(np.abs(deq - w) <= step * (0.5 if sym else 1.0) + 1e-6)


def test_clip_search_never_worse():
    w = RNG.standard_normal((128, 16)).astype(np.float32)
    w[3, 2] = 12.0  # an outlier
    for sym in (True, False):
        plain = qmath.dequantize_groups(*qmath.quantize_groups(w, 4, 32, sym, 0, search=False), 32, 0)
        best = qmath.dequantize_groups(*qmath.quantize_groups(w, 4, 32, sym, 0, search=True), 32, 0)
        assert ((best - w) ** 2).sum() <= ((plain - w) ** 2).sum() + 1e-9


def test_int4_pack_round_trip_odd():
    q = RNG.integers(0, 16, (5, 7)).astype(np.uint8)
    p = qmath.pack_int4(q)
    assert p.shape == (5, 4)
    np.testing.assert_array_equal(qmath.unpack_int4(p, 7), q)
    assert p[0, 0] == q[0, 0] | (q[0, 1] << 4)


def test_vnni_layout():
    q = RNG.integers(-127, 128, (10, 21)).astype(np.int8)
    p = qmath.vnni_pack(q, 16)
    assert p.shape == (2, 3, 16, 4)
    for k in range(10):
        for n in range(21):
            assert p[n // 16, k // 4, n % 16, k % 4] == q[k, n]
    assert not p[1, :, 5:].any() and not p[:, 2, :, 2:].any()  # zero padding


def test_gptq_beats_round_to_nearest_on_its_inputs():
    x = RNG.standard_normal((256, 64)).astype(np.float32) * np.linspace(0.1, 3, 64, dtype=np.float32)
    w = RNG.standard_normal((64, 24)).astype(np.float32)
    rtn = qmath.dequantize_groups(*qmath.quantize_groups(w, 4, 16, False, 0), 16, 0)
    q, s, z = qmath.gptq_quantize(w, x, 4, 16, False)
    gq = qmath.dequantize_groups(q, s, z, 16, 0)
    assert qmath.relative_error(x @ w, x @ gq) < qmath.relative_error(x @ w, x @ rtn)


# -- kernels -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym,bias,mkn", [
    (4, 32, True, True, (7, 64, 45)), (4, 16, False, False, (1, 48, 33)), (8, -1, True, True, (5, 33, 17)),
    (8, 16, False, False, (19, 32, 70))])
def test_weight_only_matmul_kernel(bits, group, sym, bias, mkn):
    m, k, n = mkn
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    arrays, deq = qmath.weight_only_pack(w, bits, group, sym)
    rt = kernels.wo_row_tile(n, TARGET)
    (tiles,) = _run(kernels.pad_rows(k, rt, TARGET), x, outs=[((-(-m // rt), rt, k), "float32")])
    np.testing.assert_array_equal(tiles.reshape(-1, k)[:m], x)
    assert not tiles.reshape(-1, k)[m:].any()
    func = kernels.weight_only_matmul(k, n, bits, group, sym, bias, TARGET)
    (y,) = _run(func, tiles, *arrays.values(), *([b] if bias else []), outs=[((m, n), "float32")])
    np.testing.assert_allclose(y, x @ deq + (b if bias else 0), rtol=1e-4, atol=1e-4)


def test_weight_only_kernel_decodes_one_panel_not_the_weight():
    """The fused kernel's only fp32 weight buffer is one K x NR panel per column tile, not K x N."""
    k, n = 256, 512
    func = kernels.weight_only_matmul(k, n, 4, 32, True, False, TARGET)
    mod = tvm.IRModule({"main": func})
    # the allocation passes of TVM's default TIR pipeline (what tvm.compile runs on the kernel)
    mod = s_tir.transform.PlanAndUpdateBufferAllocationLocation()(mod)
    mod = s_tir.transform.ConvertBlocksToOpaque()(mod)
    mod = s_tir.transform.CompactBufferAllocation()(mod)
    sizes = []

    def visit(node):
        for buf in node.alloc_buffers:
            if "float" in str(buf.dtype) and buf.scope() != "local":
                sizes.append(int(np.prod([int(d) for d in buf.shape])))

    tvm_ffi.structural_walk(mod["main"].body, (s_tir.SBlock, visit), order="post")
    assert sizes, "expected a decoded-panel buffer"
    assert max(sizes) <= k * 64 < k * n


def test_embedding_gather_kernel():
    v, d = 50, 64
    table = RNG.standard_normal((v, d)).astype(np.float32)
    ids = RNG.integers(0, v, 13).astype(np.int64)
    for bits, sym in ((4, False), (8, True)):
        arrays, deq = qmath.embedding_pack(table, bits, 32, sym)
        (y,) = _run(kernels.embedding_gather(v, d, bits, 32, sym, "int64", TARGET), ids, *arrays.values(),
                    outs=[((13, d), "float32")])
        np.testing.assert_allclose(y, deq[ids], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_token,static", [(True, False), (False, False), (False, True), (True, True)])
def test_quantize_activations_kernel(per_token, static):
    m, k, rt = 11, 33, 8
    x = RNG.standard_normal((m, k)).astype(np.float32) * 3
    clip = np.array([2.5], np.float32)
    args = [x] + ([clip] if static else [])
    kp, mb = 36, 2
    codes, xs = _run(kernels.quantize_activations(k, 127, per_token, static, rt, TARGET), *args,
                     outs=[((mb, rt, kp), "uint8"), ((m,), "float32")])
    rq, rs = qmath.quantize_activation_rows(x, 127, clip=clip[0] if static else None, per_token=per_token)
    flat = codes.reshape(mb * rt, kp)
    np.testing.assert_allclose(xs, rs, rtol=1e-6)
    assert np.abs(flat[:m, :k].astype(np.int32) - 128 - rq).max() <= 1  # x * (127 / range) vs numpy: 1 ulp ties
    assert (flat[:m, k:] == 128).all() and (flat[m:] == 128).all()  # padding encodes zero


@pytest.mark.parametrize("mkn,bias", [((9, 33, 40), True), ((16, 64, 32), False), ((3, 20, 7), True)])
def test_int8_matmul_kernel(mkn, bias):
    m, k, n = mkn
    lanes = kernels.int8_lanes(TARGET)
    rt = kernels.int8_row_tile(lanes)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    rq, rs = qmath.quantize_activation_rows(x, 127)
    kp, mb = -(-k // 4) * 4, -(-m // rt)
    codes = np.full((mb * rt, kp), 128, np.uint8)
    codes[:m, :k] = (rq + 128).astype(np.uint8)
    q, ws = qmath.int8_weight(w)
    wsum = np.zeros(-(-n // lanes) * lanes, np.int32)
    wsum[:n] = q.astype(np.int32).sum(0)
    func = kernels.int8_matmul(k, n, lanes, bias, TARGET)
    args = [codes.reshape(mb, rt, kp), qmath.vnni_pack(q, lanes), wsum, rs, ws] + ([b] if bias else [])
    (y,) = _run(func, *args, outs=[((m, n), "float32")])
    ref = (rq.astype(np.float64) @ q.astype(np.float64)) * rs[:, None] * ws[None] + (b if bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    assert qmath.relative_error(x @ w, y - (b if bias else 0)) < 0.03


@pytest.mark.skipif(kernels.vnni_lanes(TARGET) is None, reason="host CPU has no VNNI")
def test_int8_matmul_uses_vpdpbusd():
    lanes = kernels.int8_lanes(TARGET)
    lib = tvm.compile(_module(kernels.int8_matmul(64, 64, lanes, False, TARGET)), target=TARGET)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


def test_vnni_codegen_for_avxvnni_and_fallback_for_avx2():
    """AVX-VNNI (256-bit) targets tensorize to vpdpbusd too; AVX2-only targets (znver3) get plain int32 code."""
    adl = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "num-cores": 2})
    assert kernels.vnni_lanes(adl) == 8
    lib = tvm.compile(_module(kernels.int8_matmul(64, 40, 8, True, adl)), target=adl)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    zen = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    assert kernels.vnni_lanes(zen) is None
    lib = tvm.compile(_module(kernels.int8_matmul(64, 40, kernels.int8_lanes(zen), True, zen)),
                      target=zen)
    assert "vpdpbusd" not in lib.mod.inspect_source("asm")


# -- calibration ---------------------------------------------------------------------------------------------
def test_calibration_methods_deterministic_and_ordered():
    vals = [np.random.default_rng(i).standard_t(3, (64, 32)).astype(np.float32) for i in range(4)]
    clips = {m: calibrate.calibrate(vals, m, 99.9) for m in calibrate.METHODS}
    again = {m: calibrate.calibrate([v.copy() for v in vals], m, 99.9) for m in calibrate.METHODS}
    assert clips == again
    amax = max(float(np.abs(v).max()) for v in vals)
    assert clips["minmax"] == pytest.approx(amax)
    for m in ("percentile", "mse", "entropy"):
        assert 0 < clips[m] < amax  # heavy tails: every method clips below the max
    assert clips["percentile"] == pytest.approx(np.percentile(np.abs(np.concatenate([v.ravel() for v in vals])),
                                                            99.9))


def test_quantize_activations_smoothing():
    """SmoothQuant: codes of x * inv_smooth (per input channel), with the range taken on the smoothed values."""
    m, k, rt = 6, 20, 8
    x = RNG.standard_normal((m, k)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel
    inv = (1.0 / calibrate.smoothing_factors([x], RNG.standard_normal((k, 5)), 0.5)).astype(np.float32)
    clip = np.array([3.0], np.float32)
    codes, xs = _run(kernels.quantize_activations(k, 127, False, True, rt, TARGET, smooth=True), x, inv, clip,
                     outs=[((1, rt, 20), "uint8"), ((m,), "float32")])
    rq, rs = qmath.quantize_activation_rows(x * inv, 127, clip=3.0, per_token=False)
    np.testing.assert_allclose(xs, rs, rtol=1e-6)
    assert np.abs(codes.reshape(rt, k)[:m].astype(np.int32) - 128 - rq).max() <= 1


# -- fused producers / epilogues of the dynamic INT8 path ----------------------------------------------------
@pytest.mark.parametrize("residual,m,k", [(True, 11, 48), (False, 8, 32), (True, 3, 64)])
def test_layernorm_quantize_kernel(residual, m, k):
    """layer_norm(a (+ r)) and its per-token codes in one kernel == numpy layer norm, then the quantizer."""
    a = RNG.standard_normal((m, k)).astype(np.float32) * 3 + 1
    r = RNG.standard_normal((m, k)).astype(np.float32)
    gamma = RNG.standard_normal(k).astype(np.float32)
    beta = RNG.standard_normal(k).astype(np.float32)
    rt = 8
    mb = -(-m // rt)
    y, codes, xs = _run(kernels.layernorm_quantize(k, 1e-5, residual, 127, rt, TARGET),
                        *([a, r] if residual else [a]), gamma, beta,
                        outs=[((m, k), "float32"), ((mb, rt, k), "uint8"), ((m,), "float32")])
    x = (a + r if residual else a).astype(np.float64)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    rq, rs = qmath.quantize_activation_rows(y, 127)  # quantizing the kernel's own y: codes must agree exactly
    np.testing.assert_allclose(xs, rs, rtol=1e-6)
    flat = codes.reshape(mb * rt, k)
    assert np.abs(flat[:m].astype(np.int32) - 128 - rq).max() <= 1
    assert (flat[m:] == 128).all()


def test_int8_matmul_gelu_epilogue():
    """The exact (erf) GELU in the int8 GEMM epilogue == torch's GELU of the dequantized product."""
    m, k, n = 10, 64, 48
    lanes = kernels.int8_lanes(TARGET)
    rt = kernels.int8_row_tile(lanes)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((k, n)).astype(np.float32) * 0.3
    b = RNG.standard_normal(n).astype(np.float32)
    rq, rs = qmath.quantize_activation_rows(x, 127)
    mb = -(-m // rt)
    codes = np.full((mb * rt, k), 128, np.uint8)
    codes[:m] = (rq + 128).astype(np.uint8)
    q, ws = qmath.int8_weight(w)
    wsum = np.zeros(-(-n // lanes) * lanes, np.int32)
    wsum[:n] = q.astype(np.int32).sum(0)
    func = kernels.int8_matmul(k, n, lanes, True, TARGET, activation="gelu")
    (y,) = _run(func, codes.reshape(mb, rt, k), qmath.vnni_pack(q, lanes), wsum, rs, ws, b, outs=[((m, n), "float32")])
    import torch

    pre = (rq.astype(np.float64) @ q.astype(np.float64)) * rs[:, None] * ws[None] + b
    ref = torch.nn.functional.gelu(torch.from_numpy(pre)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-6)


def test_gptq_act_order_keeps_format_and_helps():
    """Act-order GPTQ: same contiguous groups (the kernel's format), lower output error than natural order when
    input channels differ in scale, and deterministic."""
    k, n = 128, 24
    w = RNG.standard_normal((k, n)).astype(np.float32)
    x = RNG.standard_normal((400, k)).astype(np.float32) * np.geomspace(0.05, 5, k).astype(np.float32)[::-1]
    nat = qmath.gptq_quantize(w, x, 4, 32, False, act_order=False)
    act = qmath.gptq_quantize(w, x, 4, 32, False, act_order=True)
    assert act[0].shape == (k, n) and act[1].shape == (k // 32, n) and act[0].max() <= 15
    rtn = qmath.quantize_groups(w, 4, 32, False, axis=0)

    def err(r):
        return float(((x @ (qmath.dequantize_groups(*r, 32, 0) - w)) ** 2).mean())

    assert err(act) < err(nat) < err(rtn)
    again = qmath.gptq_quantize(w, x, 4, 32, False, act_order=True)
    assert all(np.array_equal(u, v) for u, v in zip(act, again))
