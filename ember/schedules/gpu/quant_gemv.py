"""GPU kernels of ember's quantized matmuls, written already scheduled: decode fused into a split-K GEMV.

Two kernels, one loop structure (the weight-only one is the INT4 GEMV of issue 4's H100 target):

* :func:`weight_only_gemv` — ``y[i, n] = sum_k x[i, k] * (code[n, k] - zero[n, g]) * scale[n, g] (+ bias[n])``,
  INT4 or INT8 codes packed in 32-bit words along K (:func:`pack_words`), fp16 group scales, fp16 or fp32 x;
* :func:`int8_gemv` — ``y[i, n] = (sum_k xq[i, k] * wq[n, k]) * xs[i] * ws[n] (+ bias[n])`` with int8 codes
  four per int32 word and an int32 accumulator: ``__dp4a`` on CUDA, sign-extended byte products elsewhere.

Loop structure (the layout is ``W[N, K]``, K contiguous, like ember's GEMV rule for ``nn.Linear`` weights):

* a warp (32 threads on ``threadIdx.x``; a half wave on AMD, a SIMD group on Apple) owns one output column n;
  ``WARPS`` warps per block (``threadIdx.y``); at step s lane t reads weight word ``32 s + t``, so both the
  warp's weight loads (128 contiguous bytes) and its activation loads (8 consecutive fp16 values per lane, 512
  contiguous bytes) are coalesced. Giving each lane 16 consecutive bytes of weights instead (one 128-bit load)
  made the lanes' activation loads 64 bytes apart: the L1 then needs 4x the wavefronts per load and the kernel
  was bound by that (H100: 14.4 us L2-resident vs 8.6 us; BENCHMARKS.md, "INT4 GEMV");
* a lane first loads ``UNROLL`` words into registers, then decodes them: loads in flight to cover DRAM latency;
* decoding needs no int→float conversion instruction (a quarter-rate instruction on NVIDIA GPUs): OR-ing a code
  into the mantissa of 2^23 (fp32) or 1024 (fp16) and subtracting ``2^23 + zero`` gives ``code - zero`` exactly.
  With fp16 activations on CUDA (INT4) two codes are decoded per 32-bit operation (``0x000F000F`` masks) and
  multiplied in half2 registers by a small CUDA device function (:data:`_DOT8_CUDA`) — products of a 4-bit
  integer and an fp16 value, summed 8 at a time, then promoted to fp32 and scaled, so accumulation over K stays
  fp32. Other cases decode and accumulate in fp32;
* the scale is applied once per word (8 INT4 / 4 INT8 codes), never to each weight;
* the 32 partial sums meet in a warp all-reduce (shuffles); ``rows`` activation rows share every weight load.

Rows: a static row count (1..8, decode) makes one row tile; a symbolic count (``rows=None``: dynamic batch,
prefill) tiles rows by ``ROW_TILE`` on ``blockIdx.y`` with a bounds check — correct for any count, and the weight
is then re-read once per row tile (from L2 for small models): a GEMV, not a tensor-core GEMM.

Measured (H100, fp16 x, 4096 x 11008, INT4 g128, BENCHMARKS.md): 12.9 us with weights from DRAM = 60% of the
copy bandwidth, 2.7x cuBLAS fp16; 8.6 us L2-resident. :func:`weight_only_gemv_tiled` (end of this file: 16-byte
weight loads in an interleaved word order, all loads before any decode, a cheaper half2 decode, L1-bypassing weight
loads) reaches 10.2-10.4 us = 74-76% (3.5x torch) and is what ``ember.compile`` uses for static row counts where the
shape allows (:func:`tiled_applies`); this kernel remains for symbolic row counts and other shapes.
:func:`weight_only_gemv_staged` (cp.async of a warp's whole row, optional programmatic dependent launch) is faster
from L2 but slower from DRAM (13.2 us; 11.1 us back to back with PDL), so it is opt-in (``STAGED``). With only 2
steps in flight per warp (``depth=2``), 2 warps per block and a programmatic dependent launch
(:data:`STAGED_FP16_PDL`) it is the fastest kernel for back-to-back fp16 GEMVs: 9.0-9.1 us = 86% of the copy
bandwidth, 4.0x torch fp16 (runs 10-11) — issue 4's target, but only when the previous kernel triggers the launch too
(after any other kernel: 10.7-10.8 us, the tiled kernel 10.4), and only for fp16 activations (ember.compile's
quantized layers take fp32 x), so ember.compile keeps the tiled kernel.
"""

from __future__ import annotations

import numpy as np

from .cuda_async import cp_async16_source, cp_async_commit_source, cp_async_wait_source

# TVM is imported inside the kernel builders: the packing functions below are numpy only, so the GPU benchmark
# can use them on a machine with TVM's runtime alone.

WARP = 32
WARPS = 4  # warps (output columns) per block
UNROLL = 8  # weight words a lane loads before decoding them (loads in flight)
ROW_TILE = 4  # activation rows per block when the row count is symbolic
MAX_STATIC_ROWS = 8
CHUNK_WORDS = 4  # words per lane and step of the INT8 GEMV (16 bytes)


# One word of 8 INT4 codes times 8 fp16 activations on CUDA: 4 x (LOP3 [+ SHF], HSUB2, HFMA2) on half2 registers,
# one conversion to fp32. (TVM prints float16x2 arithmetic lane by lane, so this is a device function.)
_DOT8_CUDA = r"""
__forceinline__ __device__ float ember_i4_dot8(unsigned int w, void* xp, float zb) {
  const half2* x = (const half2*)xp;
  const half2 bias = __float2half2_rn(zb);
  unsigned int t0 = (w & 0x000F000Fu) | 0x64006400u;
  unsigned int t1 = ((w >> 4) & 0x000F000Fu) | 0x64006400u;
  unsigned int t2 = ((w >> 8) & 0x000F000Fu) | 0x64006400u;
  unsigned int t3 = ((w >> 12) & 0x000F000Fu) | 0x64006400u;
  half2 acc = __hmul2(__hsub2(*reinterpret_cast<half2*>(&t0), bias), x[0]);
  acc = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t1), bias), x[1], acc);
  acc = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t2), bias), x[2], acc);
  acc = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t3), bias), x[3], acc);
  float2 f = __half22float2(acc);
  return f.x + f.y;
}
"""


# -- packing (numpy, compile time) -------------------------------------------------------------------------
def element_shift(e: int, bits: int) -> int:
    """Bit offset of element ``e`` of a 32-bit word: pairs (2p, 2p+1) sit 16 bits apart, so one mask
    (``0x000F000F``/``0x00FF00FF``) after one shift extracts two neighbouring codes as the two halves of a word."""
    return (e % 2) * 16 + (e // 2) * bits


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes ``[N, K]`` (uint8 values < 2**bits, K a multiple of 32 // bits) → uint32 words ``[N, K*bits/32]``."""
    epw = 32 // bits
    n, k = codes.shape
    c = codes.astype(np.uint32).reshape(n, k // epw, epw)
    words = np.zeros((n, k // epw), np.uint32)
    for e in range(epw):
        words |= c[:, :, e] << np.uint32(element_shift(e, bits))
    return words


def unpack_words(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    epw = 32 // bits
    out = np.empty((words.shape[0], words.shape[1], epw), np.uint8)
    for e in range(epw):
        out[:, :, e] = (words >> np.uint32(element_shift(e, bits))) & np.uint32((1 << bits) - 1)
    return out.reshape(words.shape[0], -1)[:, :k]


def pack_int8_words(q: np.ndarray) -> np.ndarray:
    """int8 ``[R, K]`` → int32 words ``[R, ceil(K/4)]``, element 4w+j in byte j (little endian), zero padded."""
    r, k = q.shape
    kp = -(-k // 4) * 4
    pad = np.zeros((r, kp), np.int8)
    pad[:, :k] = q
    return np.ascontiguousarray(pad).view(np.int32).reshape(r, kp // 4)


# -- helpers -----------------------------------------------------------------------------------------------
def _vec_elems(dtype: str, target) -> int:
    """Elements per vector load: 16 bytes, at most 4 lanes on Metal (no 8-wide half vector type there)."""
    per = 16 // (2 if dtype == "float16" else 4)
    return min(per, 4) if target.kind.name == "metal" else per


def _loop(extent, thread: str, emulate: bool):
    """A GPU kernel loop: bound to ``thread``, or serial in the CPU twin (``emulate``)."""
    from tvm.script import tirx as T

    return T.serial(extent) if emulate else T.thread_binding(extent, thread=thread)


def _warp_size(target) -> int:
    return int(target.attrs.get("thread_warp_size", 32) or 32)


def _warps_for(n: int) -> int:
    w = WARPS
    while w > 1 and n % w:
        w //= 2
    return w


def weight_only_gemv(k: int, n: int, bits: int, group: int, symmetric: bool, has_bias: bool, act_dtype: str,
                     rows: int | None, target, unroll: int = UNROLL, warps: int | None = None,
                     half_decode: bool | None = None, chunk_words: int = 1, prefetch: bool = False,
                     emulate: bool = False) -> tirx.PrimFunc:
    """The fused decode + GEMV kernel (module doc). Arguments: x [m, K], qweight [N, K*bits/32] uint32,
    scales [N, K/g] fp16, [zeros [N, K/g] uint8], [bias [N] fp32], out y [m, N] (x's dtype).

    ``rows``: the static row count m (<= 8), or None for a symbolic m. K must be a multiple of ``32 // bits``
    and ``group`` (K for -1) a multiple of it too, so a word never straddles a group. ``unroll``, ``warps`` and
    ``half_decode`` (None: fp16x2 decode for fp16 x with INT4 on CUDA) and ``chunk_words`` (consecutive words per
    lane and step: 1 = lane t reads word 32 s + t, so the warp's activation loads are contiguous too; 4 = one
    16-byte weight load per lane, but the lanes' activation loads then stride 64 bytes and the L1 serves each
    warp load in 4x the wavefronts) are tuning knobs the benchmark compares. ``prefetch`` (off: NOT yet measured
    on a GPU) issues the next batch's weight loads before decoding the current batch (two register sets), the
    step the H100 figures point to for weights coming from DRAM.

    ``emulate``: the CPU twin the tests run (same index arithmetic, guards and decode): block and thread loops
    serial, the lanes' sums added into ``y`` one after the other instead of warp shuffles, fp32 decode.
    """
    from tvm.script import tirx as T

    cw = chunk_words
    assert not prefetch or cw == 1, "prefetch: one word per lane and step"
    epw = 32 // bits
    assert k % epw == 0
    g = k if group == -1 else group
    assert g % epw == 0
    kw = k // epw  # words per row
    ng = k // g
    nch = -(-kw // cw)  # 16-byte chunks per row (the last may be partial)
    ragged_words = kw % cw != 0
    steps = -(-nch // WARP)  # chunks per lane
    unroll = max(min(unroll, steps), 1)
    outer = -(-steps // unroll)
    every_lane_full = nch % WARP == 0 and steps % unroll == 0 and not ragged_words
    wb = warps or _warps_for(n)
    mt = rows if rows is not None else ROW_TILE
    symbolic = rows is None
    mask = (1 << bits) - 1
    # decode: "half2" (CUDA, fp16 x, INT4: a device function on packed half2 registers), "half" (the same
    # arithmetic written in TIR, which TVM prints lane by lane: 3x the fp16 instructions), or "fp32".
    decode = "half2" if act_dtype == "float16" and bits == 4 and target.kind.name == "cuda" else "fp32"
    if half_decode is not None:  # the benchmark compares the decodes
        decode = half_decode if isinstance(half_decode, str) else ("half" if half_decode else "fp32")
        if act_dtype != "float16" or bits != 4:
            decode = "fp32"
    if emulate:
        decode = "fp32"
    half_path = decode == "half"
    half2_path = decode == "half2"
    if half2_path:
        from tvm.backend.cuda.op import cuda_func_call

        def dot8(word, xaddr, zb):
            return cuda_func_call("ember_i4_dot8", word, xaddr, zb, source_code=_DOT8_CUDA, return_type="float32")
    else:
        def dot8(word, xaddr, zb):
            raise AssertionError("half2 decode only")
    vec = _vec_elems(act_dtype, target)
    xv_len = epw
    zero_sym = float(1 << (bits - 1))
    ws_ = _warp_size(target)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), act_dtype)
        q = T.match_buffer(q_h, (n, kw), "uint32")
        s = T.match_buffer(s_h, (n, ng), "float16")
        z = T.match_buffer(z_h, (n, ng), "uint8")
        bias = T.match_buffer(b_h, (n,), "float32")
        y = T.match_buffer(y_h, (m, n), act_dtype)
        for by in _loop((m + mt - 1) // mt if symbolic else 1, "blockIdx.y", emulate):
            for bx in _loop(n // wb, "blockIdx.x", emulate):
                for ty in _loop(wb, "threadIdx.y", emulate):
                    for tx in _loop(WARP, "threadIdx.x", emulate):
                        acc = T.decl_buffer((mt,), "float32", scope="local")
                        part = T.decl_buffer((1,), "float32", scope="local")
                        hacc = T.decl_buffer((2,), "float16", scope="local")
                        wv = T.decl_buffer((unroll * cw,), "uint32", scope="local")
                        wn = T.decl_buffer((unroll,), "uint32", scope="local")
                        xv = T.decl_buffer((xv_len,), act_dtype, scope="local")
                        red = T.decl_buffer((1,), "float32", scope="local")
                        for i in T.unroll(mt):
                            acc[i] = T.float32(0)
                        if prefetch:  # the first batch of words, before the loop
                            for u in T.unroll(unroll):
                                if every_lane_full or u * WARP + tx < nch:
                                    wn[u] = q[bx * wb + ty, u * WARP + tx]
                        for ob in range(outer):
                            if prefetch:  # take the batch loaded last step, issue the next one's loads now
                                for u in T.unroll(unroll):
                                    wv[u] = wn[u]
                                if ob + 1 < outer:
                                    for u in T.unroll(unroll):
                                        if every_lane_full or ((ob + 1) * unroll + u) * WARP + tx < nch:
                                            wn[u] = q[bx * wb + ty, ((ob + 1) * unroll + u) * WARP + tx]
                            for u in T.unroll(unroll if not prefetch else 0):
                                if every_lane_full or (ob * unroll + u) * WARP + tx < nch:
                                    if not ragged_words:
                                        for v in T.vectorized(cw):
                                            wv[u * cw + v] = q[bx * wb + ty,
                                                                        ((ob * unroll + u) * WARP + tx)
                                                                        * cw + v]
                                    else:
                                        for v in T.unroll(cw):
                                            if ((ob * unroll + u) * WARP + tx) * cw + v < kw:
                                                wv[u * cw + v] = q[
                                                    bx * wb + ty, ((ob * unroll + u) * WARP + tx) * cw + v]
                            for u in T.unroll(unroll):
                                for w in T.unroll(cw):
                                    if (every_lane_full or
                                            ((ob * unroll + u) * WARP + tx) * cw + w < kw):
                                        sc = T.Cast("float32", s[bx * wb + ty, (((ob * unroll + u) * WARP + tx)
                                                                                * cw + w) * epw // g])
                                        zf = T.Cast("float32", z[bx * wb + ty, (((ob * unroll + u) * WARP + tx)
                                                                                * cw + w) * epw // g]) \
                                            if not symmetric else T.float32(zero_sym)
                                        for i in T.unroll(mt):
                                            if True:  # (kept for the nesting of the row guard below)
                                                if not symbolic or by * mt + i < m:
                                                    for v0 in T.unroll(xv_len // vec):
                                                        for v in T.vectorized(vec):
                                                            xv[v0 * vec + v] = x[
                                                                by * mt + i,
                                                                (((ob * unroll + u) * WARP + tx) * cw + w)
                                                                * epw + v0 * vec + v]
                                                    if half2_path:
                                                        acc[i] = acc[i] + dot8(wv[u * cw + w],
                                                                               T.address_of(xv[0]),
                                                                               zf + T.float32(1024)) * sc
                                                    elif half_path:
                                                        hacc[T.ramp(0, 1, 2)] = T.Broadcast(T.float16(0), 2)
                                                        for p in T.unroll(epw // 2):
                                                            hacc[T.ramp(0, 1, 2)] = (
                                                                T.reinterpret("float16x2", T.bitwise_or(
                                                                    T.bitwise_and(T.shift_right(
                                                                        wv[u * cw + w],
                                                                        T.Cast("uint32", p * 4)),
                                                                        T.uint32(0x000F000F)),
                                                                    T.uint32(0x64006400)))
                                                                - T.Broadcast(T.Cast("float16", zf + T.float32(1024)),
                                                                              2)) \
                                                                * xv[T.ramp(p * 2, 1, 2)] + hacc[T.ramp(0, 1, 2)]
                                                        acc[i] = acc[i] + (T.Cast("float32", hacc[0])
                                                                           + T.Cast("float32", hacc[1])) * sc
                                                    else:
                                                        part[0] = T.float32(0)
                                                        for e in T.unroll(epw):
                                                            part[0] = part[0] + (T.reinterpret("float32", T.bitwise_or(
                                                                T.bitwise_and(T.shift_right(
                                                                    wv[u * cw + w],
                                                                    T.Cast("uint32", (e % 2) * 16 + (e // 2) * bits)),
                                                                    T.uint32(mask)),
                                                                T.uint32(0x4B000000)))
                                                                - (zf + T.float32(8388608))) \
                                                                * T.Cast("float32", xv[e])
                                                        acc[i] = acc[i] + part[0] * sc
                        for i in T.unroll(mt if emulate else 0):  # CPU twin: lanes in turn, summed into y
                            if not symbolic or by * mt + i < m:
                                if tx == 0:
                                    if has_bias:
                                        y[by * mt + i, bx * wb + ty] = T.Cast(act_dtype, acc[i] + bias[bx * wb + ty])
                                    else:
                                        y[by * mt + i, bx * wb + ty] = T.Cast(act_dtype, acc[i])
                                else:
                                    y[by * mt + i, bx * wb + ty] = y[by * mt + i, bx * wb + ty] + \
                                        T.Cast(act_dtype, acc[i])
                        for i in T.unroll(0 if emulate else mt):
                            red[0] = acc[i]
                            # lane 0 ends with the sum of the 32 lanes (tvm_warp_shuffle_down: __shfl_down_sync
                            # on CUDA, ds_bpermute on AMD, simd_shuffle_down on Metal)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 16, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 8, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 4, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 2, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 1, WARP, ws_)
                            if tx == 0:
                                if not symbolic or by * mt + i < m:
                                    if has_bias:
                                        y[by * mt + i, bx * wb + ty] = T.Cast(act_dtype,
                                                                              red[0] + bias[bx * wb + ty])
                                    else:
                                        y[by * mt + i, bx * wb + ty] = T.Cast(act_dtype, red[0])

    return _drop_unused(kernel, symmetric, has_bias)


def with_root_block(func: tirx.PrimFunc, params=None) -> tirx.PrimFunc:
    """The kernel with its body in a root block (Relax's passes expect one, e.g. RewriteDataflowReshape's check)
    and only ``params`` (default: all) as arguments."""
    from tvm import s_tir, tirx

    body = func.body
    if not isinstance(body, s_tir.SBlockRealize):
        body = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body))
    return tirx.PrimFunc(list(func.params) if params is None else params, body, func.ret_type, func.attrs)


def _with_kernel_attr(func: tirx.PrimFunc, key: str, value: int) -> tirx.PrimFunc:
    """``func`` with an AttrStmt ``key = value`` just inside its blockIdx.x loop: where TVM's CUDA codegen collects
    per-kernel launch attributes (``tirx.max_registers`` → ``__maxnreg__``); a PrimFunc attribute does not reach the
    device kernel that SplitHostDevice makes."""
    from tvm import s_tir, tirx

    realize = func.body  # with_root_block's root block, whose body is the blockIdx.x loop
    loop = realize.block.body
    assert isinstance(loop, tirx.For) and loop.thread_binding.thread_tag == "blockIdx.x", type(loop)
    body = tirx.AttrStmt(tirx.IntImm("int32", 0), key, tirx.IntImm("int32", value), loop.body)
    loop = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)
    blk = realize.block
    blk = s_tir.SBlock(blk.iter_vars, blk.reads, blk.writes, blk.name_hint, loop, blk.init, blk.alloc_buffers,
                       blk.match_buffers, blk.annotations)
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, blk))


def _drop_unused(func: tirx.PrimFunc, symmetric: bool, has_bias: bool) -> tirx.PrimFunc:
    """The template declares every optional argument; remove the ones this kernel does not read (zeros for
    symmetric codes, bias) so the call site passes exactly what the kernel needs."""
    drop = set()
    if symmetric:
        drop.add(3)
    if not has_bias:
        drop.add(4)
    params = [p for i, p in enumerate(func.params) if i not in drop]  # (TVM 0.27: the params are the buffers)
    return with_root_block(func, params)


def int8_gemv(k: int, n: int, has_bias: bool, rows: int | None, target, unroll: int = 4,
              emulate: bool = False) -> tirx.PrimFunc:
    """int8 x int8 → int32 GEMV with the dequantize epilogue. Arguments: xq [m, ceil(K/4)] int32 (codes),
    wq [N, ceil(K/4)] int32, xs [m] fp32, ws [N] fp32, [bias [N] fp32], out y [m, N] fp32."""
    from tvm.script import tirx as T

    kw = -(-k // 4)
    nch = -(-kw // CHUNK_WORDS)
    ragged_words = kw % CHUNK_WORDS != 0
    steps = -(-nch // WARP)
    unroll = max(min(unroll, steps), 1)
    outer = -(-steps // unroll)
    every_lane_full = nch % WARP == 0 and steps % unroll == 0 and not ragged_words
    wb = _warps_for(n)
    mt = rows if rows is not None else ROW_TILE
    symbolic = rows is None
    dp4a = target.kind.name == "cuda" and not emulate  # emulate: the CPU twin (see weight_only_gemv)
    ws_ = _warp_size(target)

    def dot4(a, b):
        if dp4a:
            return T.call_pure_extern("int32", "__dp4a", a, b, T.int32(0))
        total = T.int32(0)
        for j in range(4):  # sign-extend byte j of each word (arithmetic shifts), multiply, add
            total = total + T.shift_right(T.shift_left(a, T.int32(24 - 8 * j)), T.int32(24)) * \
                T.shift_right(T.shift_left(b, T.int32(24 - 8 * j)), T.int32(24))
        return total

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, w_h: T.handle, xs_h: T.handle, ws_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        xq = T.match_buffer(x_h, (m, kw), "int32")
        wq = T.match_buffer(w_h, (n, kw), "int32")
        xs = T.match_buffer(xs_h, (m,), "float32")
        ws = T.match_buffer(ws_h, (n,), "float32")
        bias = T.match_buffer(b_h, (n,), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        for by in _loop((m + mt - 1) // mt if symbolic else 1, "blockIdx.y", emulate):
            for bx in _loop(n // wb, "blockIdx.x", emulate):
                for ty in _loop(wb, "threadIdx.y", emulate):
                    for tx in _loop(WARP, "threadIdx.x", emulate):
                        acc = T.decl_buffer((mt,), "int32", scope="local")
                        wv = T.decl_buffer((unroll * CHUNK_WORDS,), "int32", scope="local")
                        xv = T.decl_buffer((CHUNK_WORDS,), "int32", scope="local")
                        red = T.decl_buffer((1,), "int32", scope="local")
                        for i in T.unroll(mt):
                            acc[i] = T.int32(0)
                        for ob in range(outer):
                            for u in T.unroll(unroll):
                                if every_lane_full or (ob * unroll + u) * WARP + tx < nch:
                                    for v in T.unroll(CHUNK_WORDS):
                                        if not ragged_words or \
                                                ((ob * unroll + u) * WARP + tx) * CHUNK_WORDS + v < kw:
                                            wv[u * CHUNK_WORDS + v] = wq[
                                                bx * wb + ty, ((ob * unroll + u) * WARP + tx) * CHUNK_WORDS + v]
                                        else:
                                            wv[u * CHUNK_WORDS + v] = T.int32(0)
                            for u in T.unroll(unroll):
                                if every_lane_full or (ob * unroll + u) * WARP + tx < nch:
                                    for i in T.unroll(mt):
                                        if not symbolic or by * mt + i < m:
                                            for v in T.unroll(CHUNK_WORDS):
                                                if not ragged_words or \
                                                        ((ob * unroll + u) * WARP + tx) * CHUNK_WORDS + v < kw:
                                                    xv[v] = xq[by * mt + i,
                                                               ((ob * unroll + u) * WARP + tx) * CHUNK_WORDS + v]
                                                else:
                                                    xv[v] = T.int32(0)
                                            for v in T.unroll(CHUNK_WORDS):
                                                acc[i] = acc[i] + dot4(xv[v], wv[u * CHUNK_WORDS + v])
                        for i in T.unroll(mt if emulate else 0):  # CPU twin: lanes in turn, summed into y
                            if not symbolic or by * mt + i < m:
                                if tx == 0:
                                    if has_bias:
                                        y[by * mt + i, bx * wb + ty] = T.Cast("float32", acc[i]) * xs[by * mt + i] * \
                                            ws[bx * wb + ty] + bias[bx * wb + ty]
                                    else:
                                        y[by * mt + i, bx * wb + ty] = T.Cast("float32", acc[i]) * xs[by * mt + i] * \
                                            ws[bx * wb + ty]
                                else:
                                    y[by * mt + i, bx * wb + ty] = y[by * mt + i, bx * wb + ty] + \
                                        T.Cast("float32", acc[i]) * xs[by * mt + i] * ws[bx * wb + ty]
                        for i in T.unroll(0 if emulate else mt):
                            red[0] = acc[i]
                            # lane 0 ends with the sum of the 32 lanes (tvm_warp_shuffle_down: __shfl_down_sync
                            # on CUDA, ds_bpermute on AMD, simd_shuffle_down on Metal)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 16, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 8, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 4, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 2, WARP, ws_)
                            red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 1, WARP, ws_)
                            if tx == 0:
                                if not symbolic or by * mt + i < m:
                                    if has_bias:
                                        y[by * mt + i, bx * wb + ty] = T.Cast("float32", red[0]) * xs[by * mt + i] * \
                                            ws[bx * wb + ty] + bias[bx * wb + ty]
                                    else:
                                        y[by * mt + i, bx * wb + ty] = T.Cast("float32", red[0]) * xs[by * mt + i] * \
                                            ws[bx * wb + ty]

    return _drop_unused_int8(kernel, has_bias)


def _drop_unused_int8(func, has_bias):
    return with_root_block(func, [p for i, p in enumerate(func.params) if has_bias or i != 4])


# -- the tiled GEMV: 16-byte weight loads, several output columns per warp ---------------------------------------
# Why a second kernel: the one above issues per word (8 INT4 codes) one 4-byte weight load, one 16-byte x load and one
# scale load, and every warp re-reads all of x for its one column — 4x the weight bytes through the L1. Its hot
# (L2-resident) time, 8.6 us, was already near the 9.7 us target, so deeper prefetching alone could not reach
# it (run 4: 12.2 us cold). Here a lane loads 16 bytes (4 words) per column and step, a warp owns ``cols`` columns
# that share each x load, and all of a batch's loads are issued before any decode.
TILE_LANE_WORDS = 4  # words per lane and step: one 128-bit load
TILE_CHUNK = WARP * TILE_LANE_WORDS  # words a warp reads per column and step (512 contiguous bytes)
TILED = True  # ember.compile uses the tiled kernel where tiled_applies (ember/passes/quantize/gpu.py)
TILE_COLS = 1  # output columns per warp (H100, run 5: 1 column 11.3 us cold, 2 columns 11.9, 4 columns 16.0)
TILE_WARPS = 4
TILE_STREAM = True  # weight loads that skip the L1 (ld.global.nc.L1::no_allocate)


# Cheaper INT4 decode for the tiled kernel (CUDA, fp16 x): pairs 1 and 3 are masked in place (0x00F000F0 gives
# 1024 + 16 c, exact in fp16) and rescaled by the HFMA2 that subtracts the zero point, so a word costs one shift
# instead of three; the group scale is applied in half2 (one HFMA2 into a half2 accumulator) and the conversion to
# fp32 happens once per 4 words (16-byte step), not once per word.
_DOT8S_CUDA = r"""
__forceinline__ __device__ void ember_i4_dot8s(unsigned int w, void* xp, void* accp, half s, float z) {
  const half2* x = (const half2*)xp;
  half2* acc = (half2*)accp;
  const half2 blo = __float2half2_rn(1024.0f + z);
  const half2 bhi = __float2half2_rn(-64.0f - z);
  const half2 sixteenth = __float2half2_rn(0.0625f);
  unsigned int w8 = w >> 8;
  unsigned int t0 = (w & 0x000F000Fu) | 0x64006400u;
  unsigned int t1 = (w & 0x00F000F0u) | 0x64006400u;
  unsigned int t2 = (w8 & 0x000F000Fu) | 0x64006400u;
  unsigned int t3 = (w8 & 0x00F000F0u) | 0x64006400u;
  half2 p = __hmul2(__hsub2(*reinterpret_cast<half2*>(&t0), blo), x[0]);
  p = __hfma2(__hfma2(*reinterpret_cast<half2*>(&t1), sixteenth, bhi), x[1], p);
  p = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t2), blo), x[2], p);
  p = __hfma2(__hfma2(*reinterpret_cast<half2*>(&t3), sixteenth, bhi), x[3], p);
  *acc = __hfma2(p, __half2half2(s), *acc);
}
"""

# Weight loads that bypass the L1 (each weight byte is read once): x, read by every warp of the SM, stays there.
_LD_STREAM_CUDA = r"""
__forceinline__ __device__ void ember_ld_stream16(void* dst, const void* src) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src));
  *reinterpret_cast<uint4*>(dst) = v;
}
"""
_LD_STREAM4_CUDA = r"""
__forceinline__ __device__ unsigned int ember_ld_stream4(const void* src) {
  unsigned int v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(src));
  return v;
}
"""


# The same 16-byte weight load with an L2 hint: the L2 fetches the whole 256-byte sector pair from DRAM at once.
_LD_STREAM16_L2_CUDA = r"""
__forceinline__ __device__ void ember_ld_stream16_l2(void* dst, const void* src) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src));
  *reinterpret_cast<uint4*>(dst) = v;
}
"""

# Programmatic dependent launch (sm_90+; the kernel is launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_
# SERIALIZATION through TVM's "tirx.use_programtic_dependent_launch" launch tag). ``wait`` blocks until the previous
# kernel in the stream has finished and its writes are visible: everything it may have written (x, y) is touched
# only after it; the weights and scales (constants of the model) are loaded before it, so their DRAM latency
# overlaps the previous kernel's tail. ``launch_dependents`` lets the next kernel's blocks start (and issue their
# own weight loads) while this one decodes. Without the launch attribute both are no-ops.
_PDL_WAIT_CUDA = r"""
__forceinline__ __device__ void ember_grid_dep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
"""
_PDL_LAUNCH_CUDA = r"""
__forceinline__ __device__ void ember_grid_dep_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
"""
PDL_TAG = "tirx.use_programtic_dependent_launch"

# Keeps a row's weight loads in flight together (the tiled kernel's ``hold``): ptxas schedules for register pressure
# and sinks loads whose results are used late into the decode (a side-effecting use, e.g. a predicated shared store,
# it simply moves to the end of the kernel; a dependence of the accumulators alone lets it decode early steps first).
# So every step's decode is made to depend on every loaded word: they are XOR-folded into one value f, and the
# decode's zero-point constant gets (f == magic ? -0.0 : +0.0) added (one HADD2 per kernel) — a data dependence
# ptxas cannot fold away, and exact for any f (1024 + z plus a signed zero is 1024 + z).
_HOLD_CUDA = r"""
__forceinline__ __device__ void ember_hold_words(const void* a, int na, const void* b, int nb, void* zp) {
  const unsigned int* p = (const unsigned int*)a;
  const unsigned int* q = (const unsigned int*)b;
  unsigned int f = 0u;
#pragma unroll
  for (int i = 0; i < na; ++i) f ^= p[i];
#pragma unroll
  for (int i = 0; i < nb; ++i) f ^= q[i];
  *(half*)zp = __ushort_as_half(f == 0x9E3779B9u ? (unsigned short)0x8000u : (unsigned short)0u);
}
"""
# ``hold`` with ``pdl``: ptxas hoists griddepcontrol.wait above plain loads (legal: an acquire lets earlier loads sink
# below it), so the weights would be requested only after the previous kernel ends. A branch on the folded words in
# front of the wait (both paths wait; waiting twice is harmless) keeps it below every weight load.
_HOLD_WAIT_CUDA = _HOLD_CUDA + r"""
__forceinline__ __device__ void ember_hold_words_wait(const void* a, int na, const void* b, int nb, void* zp) {
  ember_hold_words(a, na, b, nb, zp);
  unsigned int f = (unsigned int)__half_as_ushort(*(half*)zp);
  asm volatile("{\n\t.reg .pred hp;\n\tsetp.ne.u32 hp, %0, 0;\n\t@hp bra.uni EMBER_HOLD_W;\n\t"
               "griddepcontrol.wait;\n\tEMBER_HOLD_W:\n\tgriddepcontrol.wait;\n\t}" :: "r"(f) : "memory");
}
"""
# ember_i4_dot8s with that signed zero added to its zero-point constant (``hold``); _gx: x read coherently (``pdl``)
_DOT8SZ_CUDA = r"""
__forceinline__ __device__ void ember_i4_dot8sz(unsigned int w, const void* xp, void* accp, half s, float z, half zz) {
  const half2* x = (const half2*)xp;
  half2* acc = (half2*)accp;
  const half2 blo = __hadd2(__float2half2_rn(1024.0f + z), __half2half2(zz));
  const half2 bhi = __float2half2_rn(-64.0f - z);
  const half2 sixteenth = __float2half2_rn(0.0625f);
  unsigned int w8 = w >> 8;
  unsigned int t0 = (w & 0x000F000Fu) | 0x64006400u;
  unsigned int t1 = (w & 0x00F000F0u) | 0x64006400u;
  unsigned int t2 = (w8 & 0x000F000Fu) | 0x64006400u;
  unsigned int t3 = (w8 & 0x00F000F0u) | 0x64006400u;
  half2 p = __hmul2(__hsub2(*reinterpret_cast<half2*>(&t0), blo), x[0]);
  p = __hfma2(__hfma2(*reinterpret_cast<half2*>(&t1), sixteenth, bhi), x[1], p);
  p = __hfma2(__hsub2(*reinterpret_cast<half2*>(&t2), blo), x[2], p);
  p = __hfma2(__hfma2(*reinterpret_cast<half2*>(&t3), sixteenth, bhi), x[3], p);
  *acc = __hfma2(p, __half2half2(s), *acc);
}
__forceinline__ __device__ void ember_i4_dot8sz_gx(unsigned int w, const void* xg, void* accp, half s, float z,
                                                   half zz) {
  uint4 xr;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(xr.x), "=r"(xr.y), "=r"(xr.z), "=r"(xr.w) : "l"(xg) : "memory");
  ember_i4_dot8sz(w, &xr, accp, s, z, zz);
}
"""


def lane_scales_apply(k: int, bits: int, group: int) -> bool:
    """Whether :func:`interleave_scales` covers the group size: a group is at most one 32-word stripe and divides
    the 128-word chunk (INT4: groups 32, 64, 128, 256), so each lane's 4 words of a step have 4 scales."""
    epw = 32 // bits
    g = k if group == -1 else group
    gw = g // epw
    return g % epw == 0 and 0 < gw <= WARP and TILE_CHUNK % gw == 0


def scale_row(ng: int) -> int:
    """Row length of :func:`interleave_scales`' layout: ``ng`` rounded up to 8 fp16 (16 bytes)."""
    return -(-ng // 8) * 8


def interleave_scales(scales: np.ndarray, k: int, bits: int, group: int) -> np.ndarray:
    """The tiled kernel's scale order (``scale_vec=True``): scales ``[N, K/g]`` → ``[N, scale_row(K/g)]``
    (zero padded, so every row starts 16-byte aligned: whole 16-byte copies in :func:`weight_only_gemv_staged`).
    In each whole 128-word chunk c (``G = 128 / gw`` groups, ``gw`` words per group, ``H = 32 / gw`` lane groups),
    position ``c G + 4 h + j`` holds group ``c G + H j + h``:
    the scales of lane t's 4 words (logical words ``128 c + 32 j + t``, j = 0..3) are the 4 fp16 at
    ``c G + 4 (t // gw)`` — one 8-byte load instead of 4 loads. Groups of the tail stripes keep their place."""
    assert lane_scales_apply(k, bits, group), (k, bits, group)
    epw = 32 // bits
    g = k if group == -1 else group
    gw = g // epw
    n, ng = scales.shape
    G, H = TILE_CHUNK // gw, WARP // gw
    nc = (k // epw) // TILE_CHUNK
    out = np.zeros((n, scale_row(ng)), scales.dtype)
    out[:, :ng] = scales
    if nc:
        blk = scales[:, :nc * G].reshape(n, nc, TILE_LANE_WORDS, H)  # [n, c, j, h]
        out[:, :nc * G] = blk.transpose(0, 1, 3, 2).reshape(n, nc * G)  # [n, c, h, j]
    return np.ascontiguousarray(out)


def deinterleave_scales(packed: np.ndarray, k: int, bits: int, group: int) -> np.ndarray:
    epw = 32 // bits
    g = k if group == -1 else group
    gw, ng = g // epw, k // g
    n = packed.shape[0]
    G, H = TILE_CHUNK // gw, WARP // gw
    nc = (k // epw) // TILE_CHUNK
    out = np.ascontiguousarray(packed[:, :ng]).copy()
    if nc:
        blk = packed[:, :nc * G].reshape(n, nc, H, TILE_LANE_WORDS)
        out[:, :nc * G] = blk.transpose(0, 1, 3, 2).reshape(n, nc * G)
    return out


def tiled_applies(k: int, n: int, bits: int, group: int, rows: int | None, cols: int = 1, warps: int = 4) -> bool:
    """Whether :func:`weight_only_gemv_tiled` covers the shape: static rows, whole 32-word stripes (no lane idle,
    no bounds check) and whole column tiles."""
    epw = 32 // bits
    g = k if group == -1 else group
    return (rows is not None and rows <= MAX_STATIC_ROWS and k % (epw * WARP) == 0 and g % epw == 0
            and n % (cols * warps) == 0)


def interleave_words(words: np.ascontiguousarray) -> np.ndarray:
    """The tiled kernel's weight order: in each whole chunk of 128 words of a row, physical word ``4 t + j`` holds
    logical word ``32 j + t``. Lane t then reads its 4 words with one 16-byte load (a warp: 512 contiguous bytes)
    while, for each j, the 32 lanes' logical words — hence their x loads — stay contiguous. The last
    ``kw % 128`` words (whole 32-word stripes) keep their order; the kernel reads them 4 bytes per lane."""
    n, kw = words.shape
    full = kw // TILE_CHUNK * TILE_CHUNK
    out = words.copy()
    if full:
        blk = words[:, :full].reshape(n, full // TILE_CHUNK, TILE_LANE_WORDS, WARP)  # [n, c, j, t]
        out[:, :full] = blk.transpose(0, 1, 3, 2).reshape(n, full)  # [n, c, t, j]
    return np.ascontiguousarray(out)


def deinterleave_words(words: np.ndarray) -> np.ndarray:
    n, kw = words.shape
    full = kw // TILE_CHUNK * TILE_CHUNK
    out = words.copy()
    if full:
        blk = words[:, :full].reshape(n, full // TILE_CHUNK, WARP, TILE_LANE_WORDS)
        out[:, :full] = blk.transpose(0, 1, 3, 2).reshape(n, full)
    return out


def weight_only_gemv_tiled(k: int, n: int, bits: int, group: int, symmetric: bool, has_bias: bool, act_dtype: str,
                           rows: int, target, cols: int = 1, warps: int = 4, batch: int | None = None,
                           decode: str = "half2s", stream: bool = True, scale_vec: bool = False,
                           l2_hint: bool = False, hold: bool = False, pdl: str | None = None,
                           max_registers: int | None = None, emulate: bool = False) -> tirx.PrimFunc:
    """Fused decode + GEMV on :func:`interleave_words` weights; same arguments and results as
    :func:`weight_only_gemv` (qweight interleaved). Only for :func:`tiled_applies` shapes.

    A block has ``warps`` warps; warp ``ty`` of block ``bx`` owns output columns ``(bx * warps + ty) * cols + r``.
    Per step a lane loads 16 bytes of each of its ``cols`` columns (4 words: logical words ``128 c + 32 j + t``),
    the x values of those 4 words once (shared by the columns), and the 4 scales of each column. ``batch`` steps'
    loads (default: all of them — 10 for K = 11008, 40 registers a column) go out before the first decode,
    the tail stripes' 4-byte loads before those: nothing but the row count bounds the loops, so no bounds checks.

    CUDA-only knobs (the CPU twin, ``emulate``, keeps the fp32 decode and plain loads): ``decode`` — "half2"
    (:data:`_DOT8_CUDA`, fp32 scale per word) or "half2s" (:data:`_DOT8S_CUDA`: fewer instructions, scale in half2,
    fp32 once per step); ``stream`` — weight loads with ``ld.global.nc.L1::no_allocate`` (:data:`_LD_STREAM_CUDA`).
    Defaults = the fastest measured (H100, 4096 x 11008 INT4 g128, weights from DRAM, CUDA graph; BENCHMARKS.md):
    1 column, 4 warps, all loads first, half2s, stream: 10.4 us = 74% of the copy bandwidth (the one-word kernel
    above: 12.9 us; with neither half2s nor stream 11.3 us, stream alone 10.9, half2s alone 11.4; 2 columns 11.5).
    The fp16 decode sums 8 products in fp16 and 4 scaled words in fp16 before fp32 (rel. error 5.0e-4 vs a fp32
    matmul on the dequantized weights, 3.8e-4 with "half2").

    Knobs measured off (run 7, same H100 run as the default's 10.2 us): ``scale_vec`` (scales in
    :func:`interleave_scales` order, one 8-byte load per step instead of 4 two-byte loads) 11.1 us; ``l2_hint``
    (``.L2::256B`` on the weight loads) 10.4 us.

    ``hold`` (CUDA, half2s): keep every weight load of the row in flight before the first decode. ptxas otherwise
    sinks 8 of the 10 16-byte loads into the decode (nvdisasm: 2 up front), so a warp has ~1 KB in flight instead of
    5.5 KB; with :data:`_HOLD_CUDA` the SASS issues all 10 + 3 loads first. ``pdl`` ("start"/"wait", CUDA, fp16 x
    with half2s): a programmatic dependent launch as in :func:`weight_only_gemv_staged` — x read with coherent loads
    after ``griddepcontrol.wait``; ptxas hoists that wait above the weight loads unless ``hold`` is on too.
    ``max_registers``: a ``__maxnreg__`` cap (hold / pdl take 70-72 registers; above 64 only 28 of the 32 warps per SM
    fit, and the 4096 warps of the issue's shape no longer run in one wave).
    Measured (H100, runs 9-10, same runs as the default's 10.2-10.3 us): all SLOWER — hold 14.2 us (13.9 capped at
    64 registers: it spills), pdl 13.5 (12.8 capped), hold + pdl 13.0-13.3 (11.7 capped). Keeping the whole row in
    registers before any decode costs more than it gains; the staged kernel with ``depth=2`` + PDL is the one that
    reaches the target (:data:`STAGED_FP16_PDL`). Off by default, kept as measured options.
    """
    from tvm.script import tirx as T

    assert tiled_applies(k, n, bits, group, rows, cols, warps), (k, n, bits, group, rows, cols, warps)
    epw = 32 // bits
    g = k if group == -1 else group
    kw, ng = k // epw, k // g
    nc = kw // TILE_CHUNK  # whole 16-byte steps per lane
    nt = (kw % TILE_CHUNK) // WARP  # tail stripes (one word per lane each)
    b = nc if batch is None else max(1, min(batch, nc))
    while nc and nc % b:  # batches divide the steps: no guard in the loop
        b -= 1
    outer = nc // b if nc else 0
    mt, lw = rows, TILE_LANE_WORDS
    gw = g // epw  # words per group
    scale_vec = scale_vec and lane_scales_apply(k, bits, group)
    ngs = scale_row(ng) if scale_vec else ng  # interleave_scales pads rows to 16 bytes
    sg = TILE_CHUNK // gw if scale_vec else 0  # groups per 128-word chunk
    mask = (1 << bits) - 1
    zero_sym = float(1 << (bits - 1))
    cuda = target.kind.name == "cuda" and not emulate
    half2 = act_dtype == "float16" and bits == 4 and cuda
    half2s = half2 and decode == "half2s"
    half2 = half2 and not half2s
    stream = stream and cuda
    hold = hold and half2s
    pdl = pdl if cuda else None
    assert pdl in (None, "start", "wait"), pdl
    assert pdl is None or half2s, "pdl: fp16 x with the half2s decode (x loaded inside ember_i4_dot8s_gx)"
    assert not (hold or pdl) or b == nc, "hold / pdl: all steps in one batch"
    if cuda:
        from tvm.backend.cuda.op import cuda_func_call

        def dot8(word, xaddr, zb):
            return cuda_func_call("ember_i4_dot8", word, xaddr, zb, source_code=_DOT8_CUDA, return_type="float32")

        def dot8s(word, xaddr, accaddr, sc, zf):
            return cuda_func_call("ember_i4_dot8s", word, xaddr, accaddr, sc, zf, source_code=_DOT8S_CUDA)

        def ld16(dst, src):
            return cuda_func_call("ember_ld_stream16", dst, src, source_code=_LD_STREAM_CUDA)

        def ld4(src):
            return cuda_func_call("ember_ld_stream4", src, source_code=_LD_STREAM4_CUDA, return_type="uint32")

        if l2_hint:
            def ld16(dst, src):  # noqa: F811 (the hinted variant)
                return cuda_func_call("ember_ld_stream16_l2", dst, src, source_code=_LD_STREAM16_L2_CUDA)

        def hold_words(addr, count, addr2, count2, zaddr):
            if pdl is not None:  # the hold also does griddepcontrol.wait (see _HOLD_WAIT_CUDA)
                return cuda_func_call("ember_hold_words_wait", addr, count, addr2, count2, zaddr,
                                      source_code=_HOLD_WAIT_CUDA)
            return cuda_func_call("ember_hold_words", addr, count, addr2, count2, zaddr, source_code=_HOLD_CUDA)

        def dot8sz(word, xaddr, accaddr, sc, zf, zz):
            return cuda_func_call("ember_i4_dot8sz_gx" if pdl else "ember_i4_dot8sz", word, xaddr, accaddr, sc, zf,
                                  zz, source_code=_DOT8SZ_CUDA)

        def dot_s(zz, word, xaddr, accaddr, sc, zf):  # x from registers (xv)
            if hold:
                return cuda_func_call("ember_i4_dot8sz", word, xaddr, accaddr, sc, zf, zz, source_code=_DOT8SZ_CUDA)
            return dot8s(word, xaddr, accaddr, sc, zf)

        def dot_g(zz, word, xaddr, accaddr, sc, zf):  # x read from global memory after griddepcontrol.wait (pdl)
            if hold:
                return cuda_func_call("ember_i4_dot8sz_gx", word, xaddr, accaddr, sc, zf, zz,
                                      source_code=_DOT8SZ_CUDA)
            return dot8s_gx(word, xaddr, accaddr, sc, zf)

        def grid_wait():
            return cuda_func_call("ember_grid_dep_wait", source_code=_PDL_WAIT_CUDA)

        def grid_launch():
            return cuda_func_call("ember_grid_dep_launch", source_code=_PDL_LAUNCH_CUDA)

        def dot8s_gx(word, xaddr, accaddr, sc, zf):
            return cuda_func_call("ember_i4_dot8s_gx", word, xaddr, accaddr, sc, zf,
                                  source_code=_DOT8S_CUDA + _DOT8S_GX_CUDA)
    vec = _vec_elems(act_dtype, target)
    ws_ = _warp_size(target)
    wb = warps

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (mt, k), act_dtype)
        q = T.match_buffer(q_h, (n, kw), "uint32")
        s = T.match_buffer(s_h, (n, ngs), "float16")
        z = T.match_buffer(z_h, (n, ng), "uint8")
        bias = T.match_buffer(b_h, (n,), "float32")
        y = T.match_buffer(y_h, (mt, n), act_dtype)
        for bx in _loop(n // (wb * cols), "blockIdx.x", emulate):
            for ty in _loop(wb, "threadIdx.y", emulate):
                for tx in _loop(WARP, "threadIdx.x", emulate):
                    acc = T.decl_buffer((mt * cols,), "float32", scope="local")
                    wv = T.decl_buffer((max(b, 1) * cols * lw,), "uint32", scope="local")
                    wt = T.decl_buffer((max(nt, 1) * cols,), "uint32", scope="local")
                    xv = T.decl_buffer((epw,), act_dtype, scope="local")
                    part = T.decl_buffer((1,), "float32", scope="local")
                    red = T.decl_buffer((1,), "float32", scope="local")
                    hacc = T.decl_buffer((mt * cols * 2,), "float16", scope="local")
                    sv = T.decl_buffer((cols * lw,), "float16", scope="local")
                    hz = T.decl_buffer((1,), "float16", scope="local")  # hold's signed zero
                    if pdl == "start":
                        T.evaluate(grid_launch())
                    for a in T.unroll(mt * cols):
                        acc[a] = T.float32(0)
                    for a in T.unroll(mt * cols * 2 if half2s else 0):
                        hacc[a] = T.float16(0)
                    for j in T.unroll(nt):  # the tail's loads first: they wait on DRAM while the batches go out
                        for r in T.unroll(cols):
                            if stream:
                                wt[j * cols + r] = ld4(T.address_of(q[(bx * wb + ty) * cols + r,
                                                                      nc * TILE_CHUNK + j * WARP + tx]))
                            else:
                                wt[j * cols + r] = q[(bx * wb + ty) * cols + r, nc * TILE_CHUNK + j * WARP + tx]
                    for ob in range(outer):
                        for u in T.unroll(b):
                            for r in T.unroll(cols):
                                if stream:
                                    T.evaluate(ld16(T.address_of(wv[(u * cols + r) * lw]),
                                                    T.address_of(q[(bx * wb + ty) * cols + r,
                                                                   ((ob * b + u) * WARP + tx) * lw])))
                                else:
                                    for v in T.vectorized(lw):
                                        wv[(u * cols + r) * lw + v] = q[(bx * wb + ty) * cols + r,
                                                                        ((ob * b + u) * WARP + tx) * lw + v]
                        if hold:  # every load above issued before any decode (see _HOLD_CUDA)
                            T.evaluate(hold_words(T.address_of(wv[0]), b * cols * lw, T.address_of(wt[0]),
                                                  nt * cols, T.address_of(hz[0])))
                        if pdl is not None:  # weights in flight; x and y only after the previous kernel is done
                            if not hold:  # (hold waits itself, after a branch on the loaded words)
                                T.evaluate(grid_wait())
                            if pdl == "wait":
                                T.evaluate(grid_launch())
                        for u in T.unroll(b):
                            if scale_vec:  # the 4 scales of this step's 4 words, one 8-byte load a column
                                for r in T.unroll(cols):
                                    for v in T.vectorized(lw):
                                        sv[r * lw + v] = s[(bx * wb + ty) * cols + r,
                                                           (ob * b + u) * sg + (tx // gw) * lw + v]
                            for j in T.unroll(lw):
                                for i in T.unroll(mt):
                                    for v0 in T.unroll((epw // vec if epw >= vec else 1) if pdl is None else 0):
                                        for v in T.vectorized(min(vec, epw)):
                                            xv[v0 * vec + v] = x[i, (((ob * b + u) * lw + j) * WARP + tx) * epw
                                                                 + v0 * vec + v]
                                    for r in T.unroll(cols):
                                        sc = T.Cast("float32", sv[r * lw + j]) if scale_vec else T.Cast(
                                            "float32", s[(bx * wb + ty) * cols + r,
                                                         (((ob * b + u) * lw + j) * WARP + tx) * epw // g])
                                        zf = T.Cast("float32", z[(bx * wb + ty) * cols + r,
                                                                 (((ob * b + u) * lw + j) * WARP + tx) * epw // g]) \
                                            if not symmetric else T.float32(zero_sym)
                                        if pdl is not None:  # x loaded coherently inside, after the wait
                                            T.evaluate(dot_g(hz[0], wv[(u * cols + r) * lw + j], T.address_of(
                                                x[i, (((ob * b + u) * lw + j) * WARP + tx) * epw]),
                                                T.address_of(hacc[(i * cols + r) * 2]),
                                                sv[r * lw + j] if scale_vec else
                                                s[(bx * wb + ty) * cols + r,
                                                  (((ob * b + u) * lw + j) * WARP + tx) * epw // g], zf))
                                        elif half2s:
                                            T.evaluate(dot_s(hz[0], wv[(u * cols + r) * lw + j], T.address_of(xv[0]),
                                                             T.address_of(hacc[(i * cols + r) * 2]),
                                                             sv[r * lw + j] if scale_vec else
                                                             s[(bx * wb + ty) * cols + r,
                                                               (((ob * b + u) * lw + j) * WARP + tx) * epw // g],
                                                             zf))
                                        elif half2:
                                            acc[i * cols + r] = acc[i * cols + r] + dot8(
                                                wv[(u * cols + r) * lw + j], T.address_of(xv[0]),
                                                zf + T.float32(1024)) * sc
                                        else:
                                            part[0] = T.float32(0)
                                            for e in T.unroll(epw):
                                                part[0] = part[0] + (T.reinterpret("float32", T.bitwise_or(
                                                    T.bitwise_and(T.shift_right(
                                                        wv[(u * cols + r) * lw + j],
                                                        T.Cast("uint32", (e % 2) * 16 + (e // 2) * bits)),
                                                        T.uint32(mask)), T.uint32(0x4B000000)))
                                                    - (zf + T.float32(8388608))) * T.Cast("float32", xv[e])
                                            acc[i * cols + r] = acc[i * cols + r] + part[0] * sc
                            for a in T.unroll(mt * cols if half2s else 0):  # half2 sums of this step into fp32
                                acc[a] = acc[a] + (T.Cast("float32", hacc[a * 2]) + T.Cast("float32", hacc[a * 2 + 1]))
                                hacc[a * 2] = T.float16(0)
                                hacc[a * 2 + 1] = T.float16(0)
                    for j in T.unroll(nt):
                        for i in T.unroll(mt):
                            for v0 in T.unroll((epw // vec if epw >= vec else 1) if pdl is None else 0):
                                for v in T.vectorized(min(vec, epw)):
                                    xv[v0 * vec + v] = x[i, (nc * TILE_CHUNK + j * WARP + tx) * epw + v0 * vec + v]
                            for r in T.unroll(cols):
                                sc = T.Cast("float32", s[(bx * wb + ty) * cols + r,
                                                         (nc * TILE_CHUNK + j * WARP + tx) * epw // g])
                                zf = T.Cast("float32", z[(bx * wb + ty) * cols + r,
                                                         (nc * TILE_CHUNK + j * WARP + tx) * epw // g]) \
                                    if not symmetric else T.float32(zero_sym)
                                if pdl is not None:
                                    T.evaluate(dot_g(hz[0], wt[j * cols + r], T.address_of(
                                        x[i, (nc * TILE_CHUNK + j * WARP + tx) * epw]),
                                        T.address_of(hacc[(i * cols + r) * 2]),
                                        s[(bx * wb + ty) * cols + r, (nc * TILE_CHUNK + j * WARP + tx) * epw // g],
                                        zf))
                                elif half2s:
                                    T.evaluate(dot_s(hz[0], wt[j * cols + r], T.address_of(xv[0]),
                                                     T.address_of(hacc[(i * cols + r) * 2]),
                                                     s[(bx * wb + ty) * cols + r,
                                                       (nc * TILE_CHUNK + j * WARP + tx) * epw // g], zf))
                                elif half2:
                                    acc[i * cols + r] = acc[i * cols + r] + dot8(
                                        wt[j * cols + r], T.address_of(xv[0]), zf + T.float32(1024)) * sc
                                else:
                                    part[0] = T.float32(0)
                                    for e in T.unroll(epw):
                                        part[0] = part[0] + (T.reinterpret("float32", T.bitwise_or(
                                            T.bitwise_and(T.shift_right(
                                                wt[j * cols + r],
                                                T.Cast("uint32", (e % 2) * 16 + (e // 2) * bits)),
                                                T.uint32(mask)), T.uint32(0x4B000000)))
                                            - (zf + T.float32(8388608))) * T.Cast("float32", xv[e])
                                    acc[i * cols + r] = acc[i * cols + r] + part[0] * sc
                    for a in T.unroll(mt * cols if half2s else 0):  # the tail's half2 sums
                        acc[a] = acc[a] + (T.Cast("float32", hacc[a * 2]) + T.Cast("float32", hacc[a * 2 + 1]))
                    for a in T.unroll(mt * cols if emulate else 0):  # CPU twin: lanes in turn, summed into y
                        if tx == 0:
                            if has_bias:
                                y[a // cols, (bx * wb + ty) * cols + a % cols] = T.Cast(
                                    act_dtype, acc[a] + bias[(bx * wb + ty) * cols + a % cols])
                            else:
                                y[a // cols, (bx * wb + ty) * cols + a % cols] = T.Cast(act_dtype, acc[a])
                        else:
                            y[a // cols, (bx * wb + ty) * cols + a % cols] = \
                                y[a // cols, (bx * wb + ty) * cols + a % cols] + T.Cast(act_dtype, acc[a])
                    for a in T.unroll(0 if emulate else mt * cols):
                        red[0] = acc[a]
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 16, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 8, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 4, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 2, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 1, WARP, ws_)
                        if tx == 0:
                            if has_bias:
                                y[a // cols, (bx * wb + ty) * cols + a % cols] = T.Cast(
                                    act_dtype, red[0] + bias[(bx * wb + ty) * cols + a % cols])
                            else:
                                y[a // cols, (bx * wb + ty) * cols + a % cols] = T.Cast(act_dtype, red[0])

    func = _drop_unused(kernel, symmetric, has_bias)
    if max_registers and cuda:  # CUDA __maxnreg__: the register cap ptxas must fit (occupancy, see the doc)
        func = _with_kernel_attr(func, "tirx.max_registers", max_registers)
    return func.with_attr("tirx.kernel_launch_params", [PDL_TAG]) if pdl is not None else func


# -- the staged GEMV: every weight byte of a warp's row in flight at once (cp.async into shared memory) ----------
# Why it was written: in the tiled kernel above, ptxas does not keep "all loads before any decode" — the SASS
# (nvdisasm) issues 2 of the 10 16-byte weight loads up front and the others one per decoded step (62 registers), so
# a warp has ~1 KB in flight, and the tiled kernel takes as long with its weights in L2 as from DRAM (10.2 us both,
# run 7). cp.async copies cannot be sunk below the wait that consumes them: here a warp issues its whole 5.5 KB row
# (+ its scales) at once. What it measured (H100, BENCHMARKS.md runs 7-8): from L2 8.6 us (the tiled 10.2), but from
# DRAM 13.2 us — slower than the tiled kernel's 10.2, with or without one wait per step (``pipeline``), 2 or 8 warps
# per block or an L2 prefetch hint; so ember.compile keeps the tiled kernel (``STAGED`` off). It is the kernel that
# carries a programmatic dependent launch (``pdl``), which took 2.1 us off each of back-to-back calls (13.2 -> 11.1)
# and nothing after a kernel that does not trigger it. The decode reads the words back from shared memory (the lane's
# own 16 bytes: no bank conflicts). Runs 9-11 (helper C2): ``depth`` (only that many steps in flight per warp) alone
# gains little (depth 2: 12.7 us), but with PDL it is what reaches issue 4's target for back-to-back fp16 GEMVs:
# depth 2, 2 warps per block, pdl "wait": 9.0 / 9.1 us (:data:`STAGED_FP16_PDL`).
_CP_ASYNC_CUDA = cp_async16_source("ember_cp_async16")
_CP_ASYNC_L2_CUDA = cp_async16_source("ember_cp_async16_l2", l2_prefetch=True)
_CP_WAIT_CUDA = r"""
__forceinline__ __device__ void ember_cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
  __syncwarp();
}
"""
# x after griddepcontrol.wait: a coherent load (not ld.global.nc, which is what nvcc makes of a __restrict__ input
# that the kernel never writes — and ptxas hoisted those above the wait: x read before the producer finished).
_DOT8S_GX_CUDA = r"""
__forceinline__ __device__ void ember_i4_dot8s_gx(unsigned int w, const void* xg, void* accp, half s, float z) {
  uint4 xr;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(xr.x), "=r"(xr.y), "=r"(xr.z), "=r"(xr.w) : "l"(xg) : "memory");
  ember_i4_dot8s(w, &xr, accp, s, z);
}
"""
# The pipelined variant: one cp.async group per 16-byte step; step c is decoded once groups 0..c have landed
# (wait_group takes an immediate: the switch folds once the call is inlined with a constant).
_CP_COMMIT_CUDA = cp_async_commit_source("ember_cp_async_commit")
_CP_WAIT_N_CUDA = cp_async_wait_source("ember_cp_async_wait_n", 15, sync_warp=True)
# Off: measured slower than the tiled kernel where the weights come from DRAM (H100, 4096 x 11008 g128, CUDA graph,
# BENCHMARKS.md run 7-8: 13.2 us vs 10.2; after another kernel 13.2-13.5 vs 10.4) though faster from L2 (8.6 vs 10.2)
# and, with pdl between back-to-back GEMVs, 11.1 us. ember.compile emits it only when this is switched on.
STAGED = False
STAGED_WARPS = 4
# The fastest configuration for back-to-back fp16 GEMVs (H100, 4096 x 11008 INT4 g128, cold, CUDA graph; BENCHMARKS.md
# runs 9-11): 9.0 / 9.1 us (86%, 4.0x torch fp16 eager) vs depth 3: 9.2-9.3, depth 1 / 4: 9.5-9.6, 1 warp per block:
# 11.3-11.7, 4 / 8 warps: 9.7-10.1 / 9.6, no PDL: 12.7. pdl="start" measured the same (9.0-9.1). ember.compile emits
# it for INT4 layers of precision="fp16" models on sm_90+ (ember.passes.quantize.gpu.pdl_gemv_applies; every other
# kernel then triggers early: ember.passes.pdl): decode step 27.5 us vs 38.1 us without (BENCHMARKS.md run 12).
STAGED_FP16_PDL = dict(depth=2, pdl="wait", warps=2)
STAGED_PIPELINE = False  # one cp.async group per step, decoded as it lands: measured no change (13.3 vs 13.2 us)


def staged_applies(k: int, n: int, bits: int, group: int, rows: int | None, warps: int = STAGED_WARPS,
                   target=None) -> bool:
    """CUDA (cp.async; ``target`` None: not checked), :func:`tiled_applies` (whole 32-word stripes, static rows,
    whole blocks), groups :func:`interleave_scales` covers, and a block's rows + scales within the 48 KB of static
    shared memory."""
    if target is not None and target.kind.name != "cuda":
        return False
    epw = 32 // bits
    g = k if group == -1 else group
    if not (tiled_applies(k, n, bits, group, rows, 1, warps) and lane_scales_apply(k, bits, group)):
        return False
    kw, ng = k // epw, k // g
    return warps * (kw * 4 + scale_row(ng) * 2) <= 48 * 1024


def weight_only_gemv_staged(k: int, n: int, bits: int, group: int, symmetric: bool, has_bias: bool,
                            act_dtype: str, rows: int, target, warps: int = STAGED_WARPS, pdl: str | None = None,
                            l2_hint: bool = False, decode: str = "half2s", pipeline: bool = False,
                            depth: int | None = None, emulate: bool = False,
                            out_dtype: str | None = None) -> tirx.PrimFunc:
    """Fused decode + GEMV on :func:`interleave_words` weights and :func:`interleave_scales` scales (same arguments
    and result as :func:`weight_only_gemv_tiled`; scales ``[N, scale_row(K/g)]``). One output column per warp.

    A lane first copies (cp.async, L2 only) its 16 bytes of every 128-word step of the warp's row into shared memory,
    plus the row's tail stripes and scales (16 bytes per lane), then waits for all of them at once; the decode then
    reads its own words (one 16-byte shared load per step) and its 4 scales of a step (one 8-byte load).
    ``pdl`` ("start"/"wait": where the kernel lets the next one launch) makes the kernel a programmatic dependent
    launch: the copies go out before ``griddepcontrol.wait``, x and y are touched only after it.
    ``pipeline``: one cp.async group per step, step c decoded once groups 0..c have landed (copies still all issued
    first). ``depth``: only ``depth`` steps in flight per warp — the scales, the tail and steps 0..depth-1 first
    (with ``pdl``: before the wait), then step c + depth issued while step c is decoded (a software pipeline between
    the tiled kernel's ~1 KB and this kernel's whole 5.5 KB row in flight per warp). Measured (H100, runs 9-11, cold,
    CUDA graph): without PDL depth 2/3/5 12.7/13.1/13.8 us; with pdl="wait" depth 1-4 9.7-10.3 (4 warps), 9.0-9.6
    (2 warps; depth 2 best: 9.0 / 9.1), 11.3-11.7 (1 warp) — :data:`STAGED_FP16_PDL`.
    ``emulate``: the CPU twin (plain copies, fp32 decode, serial lanes), as in :func:`weight_only_gemv`.
    ``out_dtype``: y's dtype (default ``act_dtype``); ember.compile's PDL layers read fp16 x and write fp32 y (the
    sums are fp32 anyway), so no cast kernel follows the GEMV and its fp32 consumers read y directly.
    """
    out_dtype = out_dtype or act_dtype
    from tvm.script import tirx as T

    assert staged_applies(k, n, bits, group, rows, warps), (k, n, bits, group, rows, warps)
    epw = 32 // bits
    g = k if group == -1 else group
    kw, ng = k // epw, k // g
    gw = g // epw
    ngs = scale_row(ng)
    nc = kw // TILE_CHUNK
    nt = (kw % TILE_CHUNK) // WARP
    sg = TILE_CHUNK // gw
    tail_chunks = nt * WARP // TILE_LANE_WORDS  # 16-byte copies of the tail stripes (<= 24)
    scale_chunks = ngs // 8
    mt, lw = rows, TILE_LANE_WORDS
    mask = (1 << bits) - 1
    zero_sym = float(1 << (bits - 1))
    cuda = target.kind.name == "cuda" and not emulate
    half2s = act_dtype == "float16" and bits == 4 and cuda and decode == "half2s"
    pdl = pdl if cuda else None
    assert pdl in (None, "start", "wait"), pdl
    assert pdl is None or half2s, "pdl: fp16 x with the half2s decode (x loaded inside ember_i4_dot8s_gx)"
    from tvm.backend.cuda.op import cuda_func_call

    def dot8s_gx(word, xaddr, accaddr, sc, zf):
        return cuda_func_call("ember_i4_dot8s_gx", word, xaddr, accaddr, sc, zf,
                              source_code=_DOT8S_CUDA + _DOT8S_GX_CUDA)

    def cp16(dst, last, src):
        # ``last``: the address of the copy's last element, unused in the device function; TVM sizes (compacts) a
        # shared buffer by the elements the kernel touches, and an address_of counts as one element — without it
        # the scale rows shrank from 88 to 86 halves (the last 2 never read) and the 16-byte copies misaligned.
        if l2_hint:
            return cuda_func_call("ember_cp_async16_l2", dst, last, src, source_code=_CP_ASYNC_L2_CUDA)
        return cuda_func_call("ember_cp_async16", dst, last, src, source_code=_CP_ASYNC_CUDA)

    def cp_wait():
        return cuda_func_call("ember_cp_async_wait_all", source_code=_CP_WAIT_CUDA)

    def cp_commit():
        return cuda_func_call("ember_cp_async_commit", source_code=_CP_COMMIT_CUDA)

    def cp_wait_n(pending):  # wait_group takes at most 15 here: waiting for more than needed is still correct
        return cuda_func_call("ember_cp_async_wait_n", T.min(pending, 15), source_code=_CP_WAIT_N_CUDA)

    depth = depth if depth is not None and 0 < depth < nc else None
    pipe = pipeline and cuda and depth is None
    dep = depth is not None and cuda  # the groups of the depth pipeline (the twin copies in program order)

    def grid_wait():
        return cuda_func_call("ember_grid_dep_wait", source_code=_PDL_WAIT_CUDA)

    def grid_launch():
        return cuda_func_call("ember_grid_dep_launch", source_code=_PDL_LAUNCH_CUDA)

    def dot8s(word, xaddr, accaddr, sc, zf):
        return cuda_func_call("ember_i4_dot8s", word, xaddr, accaddr, sc, zf, source_code=_DOT8S_CUDA)

    vec = _vec_elems(act_dtype, target)
    ws_ = _warp_size(target)
    wb = warps
    smem = "local" if emulate else "shared"

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (mt, k), act_dtype)
        q = T.match_buffer(q_h, (n, kw), "uint32")
        s = T.match_buffer(s_h, (n, ngs), "float16")
        z = T.match_buffer(z_h, (n, ng), "uint8")
        bias = T.match_buffer(b_h, (n,), "float32")
        y = T.match_buffer(y_h, (mt, n), out_dtype)
        for bx in _loop(n // wb, "blockIdx.x", emulate):
            qs = T.decl_buffer((wb, kw), "uint32", scope=smem)
            ss = T.decl_buffer((wb, ngs), "float16", scope=smem)
            for ty in _loop(wb, "threadIdx.y", emulate):
                # two loops over the lanes: the copies, then (after every lane's copies: cp.async.wait_group +
                # __syncwarp on CUDA, the loop order in the serial CPU twin) the decode, which reads the tail
                # stripes and scales that other lanes copied
                for tx in _loop(WARP, "threadIdx.x", emulate):
                    if pdl == "start":
                        T.evaluate(grid_launch())
                    # the copies: the row's scales (first: the pipelined variant's first group holds them), its
                    # whole steps (lane t: physical words 4t..4t+3 of each 128-word chunk) and its tail stripes
                    for c in T.unroll(-(-scale_chunks // WARP)):
                        if c * WARP + tx < scale_chunks:
                            if cuda:
                                T.evaluate(cp16(T.address_of(ss[ty, (c * WARP + tx) * 8]),
                                                T.address_of(ss[ty, (c * WARP + tx) * 8 + 7]),
                                                T.address_of(s[bx * wb + ty, (c * WARP + tx) * 8])))
                            else:
                                for v in T.serial(8):
                                    ss[ty, (c * WARP + tx) * 8 + v] = s[bx * wb + ty, (c * WARP + tx) * 8 + v]
                    for c in T.unroll(-(-tail_chunks // WARP) if depth is not None else 0):
                        if c * WARP + tx < tail_chunks:
                            if cuda:
                                T.evaluate(cp16(T.address_of(qs[ty, nc * TILE_CHUNK + (c * WARP + tx) * lw]),
                                                T.address_of(qs[ty, nc * TILE_CHUNK + (c * WARP + tx) * lw + lw - 1]),
                                                T.address_of(q[bx * wb + ty, nc * TILE_CHUNK + (c * WARP + tx) * lw])))
                            else:
                                for v in T.serial(lw):
                                    qs[ty, nc * TILE_CHUNK + (c * WARP + tx) * lw + v] = \
                                        q[bx * wb + ty, nc * TILE_CHUNK + (c * WARP + tx) * lw + v]
                    for c in T.unroll(nc if depth is None else depth):
                        if cuda:
                            T.evaluate(cp16(T.address_of(qs[ty, (c * WARP + tx) * lw]),
                                            T.address_of(qs[ty, (c * WARP + tx) * lw + lw - 1]),
                                            T.address_of(q[bx * wb + ty, (c * WARP + tx) * lw])))
                        else:
                            for v in T.serial(lw):
                                qs[ty, (c * WARP + tx) * lw + v] = q[bx * wb + ty, (c * WARP + tx) * lw + v]
                        if pipe or dep:  # one group per step (the first also holds the scales [and tail])
                            T.evaluate(cp_commit())
                    for c in T.unroll(-(-tail_chunks // WARP) if depth is None else 0):
                        if c * WARP + tx < tail_chunks:
                            if cuda:
                                T.evaluate(cp16(T.address_of(qs[ty, nc * TILE_CHUNK + (c * WARP + tx) * lw]),
                                                T.address_of(qs[ty, nc * TILE_CHUNK + (c * WARP + tx) * lw + lw - 1]),
                                                T.address_of(q[bx * wb + ty, nc * TILE_CHUNK + (c * WARP + tx) * lw])))
                            else:
                                for v in T.serial(lw):
                                    qs[ty, nc * TILE_CHUNK + (c * WARP + tx) * lw + v] = \
                                        q[bx * wb + ty, nc * TILE_CHUNK + (c * WARP + tx) * lw + v]
                    if pipe:  # the tail's group (the last)
                        T.evaluate(cp_commit())
                for tx in _loop(WARP, "threadIdx.x", emulate):
                    acc = T.decl_buffer((mt,), "float32", scope="local")
                    wv = T.decl_buffer((lw,), "uint32", scope="local")
                    sv = T.decl_buffer((lw,), "float16", scope="local")
                    xv = T.decl_buffer((epw,), act_dtype, scope="local")
                    part = T.decl_buffer((1,), "float32", scope="local")
                    red = T.decl_buffer((1,), "float32", scope="local")
                    hacc = T.decl_buffer((mt * 2,), "float16", scope="local")
                    if pdl is not None:  # weights in flight; x and y only after the previous kernel is done
                        T.evaluate(grid_wait())
                        if pdl == "wait":
                            T.evaluate(grid_launch())
                    if cuda and not pipe and not dep:
                        T.evaluate(cp_wait())
                    for a in T.unroll(mt):
                        acc[a] = T.float32(0)
                    for a in T.unroll(mt * 2 if half2s else 0):
                        hacc[a] = T.float16(0)
                    for c in T.unroll(nc):
                        if depth is not None:  # issue step c + depth (this lane's own words), then wait for step c
                            if c + depth < nc:
                                if cuda:
                                    T.evaluate(cp16(T.address_of(qs[ty, ((c + depth) * WARP + tx) * lw]),
                                                    T.address_of(qs[ty, ((c + depth) * WARP + tx) * lw + lw - 1]),
                                                    T.address_of(q[bx * wb + ty, ((c + depth) * WARP + tx) * lw])))
                                else:
                                    for v in T.serial(lw):
                                        qs[ty, ((c + depth) * WARP + tx) * lw + v] = \
                                            q[bx * wb + ty, ((c + depth) * WARP + tx) * lw + v]
                            if dep:  # an empty group past the last step keeps "depth groups pending" uniform
                                T.evaluate(cp_commit())
                                T.evaluate(cp_wait_n(depth))
                        if pipe:  # groups 0..c landed: nc - c may still be in flight
                            T.evaluate(cp_wait_n(nc - c))
                        for v in T.vectorized(lw):
                            wv[v] = qs[ty, (c * WARP + tx) * lw + v]
                        for v in T.vectorized(lw):
                            sv[v] = ss[ty, c * sg + (tx // gw) * lw + v]
                        for j in T.unroll(lw):
                            for i in T.unroll(mt):
                                if pdl is None:
                                    for v0 in T.unroll(epw // vec if epw >= vec else 1):
                                        for v in T.vectorized(min(vec, epw)):
                                            xv[v0 * vec + v] = x[i, ((c * lw + j) * WARP + tx) * epw + v0 * vec + v]
                                zf = T.Cast("float32", z[bx * wb + ty, ((c * lw + j) * WARP + tx) * epw // g]) \
                                    if not symmetric else T.float32(zero_sym)
                                if pdl is not None:  # x loaded coherently inside, after griddepcontrol.wait
                                    T.evaluate(dot8s_gx(wv[j], T.address_of(x[i, ((c * lw + j) * WARP + tx) * epw]),
                                                        T.address_of(hacc[i * 2]), sv[j], zf))
                                elif half2s:
                                    T.evaluate(dot8s(wv[j], T.address_of(xv[0]), T.address_of(hacc[i * 2]), sv[j], zf))
                                else:
                                    part[0] = T.float32(0)
                                    for e in T.unroll(epw):
                                        part[0] = part[0] + (T.reinterpret("float32", T.bitwise_or(
                                            T.bitwise_and(T.shift_right(
                                                wv[j], T.Cast("uint32", (e % 2) * 16 + (e // 2) * bits)),
                                                T.uint32(mask)), T.uint32(0x4B000000)))
                                            - (zf + T.float32(8388608))) * T.Cast("float32", xv[e])
                                    acc[i] = acc[i] + part[0] * T.Cast("float32", sv[j])
                        for a in T.unroll(mt if half2s else 0):  # this step's half2 sums into fp32
                            acc[a] = acc[a] + (T.Cast("float32", hacc[a * 2]) + T.Cast("float32", hacc[a * 2 + 1]))
                            hacc[a * 2] = T.float16(0)
                            hacc[a * 2 + 1] = T.float16(0)
                    if pipe:
                        T.evaluate(cp_wait_n(0))
                    for j in T.unroll(nt):
                        for i in T.unroll(mt):
                            if pdl is None:
                                for v0 in T.unroll(epw // vec if epw >= vec else 1):
                                    for v in T.vectorized(min(vec, epw)):
                                        xv[v0 * vec + v] = x[i, (nc * TILE_CHUNK + j * WARP + tx) * epw + v0 * vec + v]
                            zf = T.Cast("float32", z[bx * wb + ty, (nc * TILE_CHUNK + j * WARP + tx) * epw // g]) \
                                if not symmetric else T.float32(zero_sym)
                            if pdl is not None:
                                T.evaluate(dot8s_gx(qs[ty, nc * TILE_CHUNK + j * WARP + tx],
                                                    T.address_of(x[i, (nc * TILE_CHUNK + j * WARP + tx) * epw]),
                                                    T.address_of(hacc[i * 2]),
                                                    ss[ty, (nc * TILE_CHUNK + j * WARP + tx) * epw // g], zf))
                            elif half2s:
                                T.evaluate(dot8s(qs[ty, nc * TILE_CHUNK + j * WARP + tx], T.address_of(xv[0]),
                                                 T.address_of(hacc[i * 2]),
                                                 ss[ty, (nc * TILE_CHUNK + j * WARP + tx) * epw // g], zf))
                            else:
                                part[0] = T.float32(0)
                                for e in T.unroll(epw):
                                    part[0] = part[0] + (T.reinterpret("float32", T.bitwise_or(
                                        T.bitwise_and(T.shift_right(
                                            qs[ty, nc * TILE_CHUNK + j * WARP + tx],
                                            T.Cast("uint32", (e % 2) * 16 + (e // 2) * bits)),
                                            T.uint32(mask)), T.uint32(0x4B000000)))
                                        - (zf + T.float32(8388608))) * T.Cast("float32", xv[e])
                                acc[i] = acc[i] + part[0] * T.Cast(
                                    "float32", ss[ty, (nc * TILE_CHUNK + j * WARP + tx) * epw // g])
                    for a in T.unroll(mt if half2s else 0):  # the tail's half2 sums
                        acc[a] = acc[a] + (T.Cast("float32", hacc[a * 2]) + T.Cast("float32", hacc[a * 2 + 1]))
                    for a in T.unroll(mt if emulate else 0):  # CPU twin: lanes in turn, summed into y
                        if tx == 0:
                            if has_bias:
                                y[a, bx * wb + ty] = T.Cast(out_dtype, acc[a] + bias[bx * wb + ty])
                            else:
                                y[a, bx * wb + ty] = T.Cast(out_dtype, acc[a])
                        else:
                            y[a, bx * wb + ty] = y[a, bx * wb + ty] + T.Cast(out_dtype, acc[a])
                    for a in T.unroll(0 if emulate else mt):
                        red[0] = acc[a]
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 16, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 8, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 4, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 2, WARP, ws_)
                        red[0] = red[0] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), red[0], 1, WARP, ws_)
                        if tx == 0:
                            if has_bias:
                                y[a, bx * wb + ty] = T.Cast(out_dtype, red[0] + bias[bx * wb + ty])
                            else:
                                y[a, bx * wb + ty] = T.Cast(out_dtype, red[0])

    func = _drop_unused(kernel, symmetric, has_bias)
    return func.with_attr("tirx.kernel_launch_params", [PDL_TAG]) if pdl is not None else func
