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
copy bandwidth, 2.7x cuBLAS fp16; 8.6 us L2-resident. Not yet the issue's 80% / 4x: the loads of the next
``UNROLL`` words are not issued before the current ones are decoded (no software pipelining yet).
"""

from __future__ import annotations

import numpy as np

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
