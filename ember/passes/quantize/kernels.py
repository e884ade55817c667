"""TIR kernels of the quantized operators, written in TE and scheduled here for the CPU target.

Every kernel is a complete, already-scheduled PrimFunc (``tirx.is_scheduled``) with ``op_pattern`` opaque, so
ember's generic schedule rules and FuseOps leave it alone: the fusion that matters — decoding the weights
inside the matmul — is done by construction, not left to a pass that might not do it.

* :func:`weight_only_matmul` — ``y[m, n] = sum_k x[m, k] * deq(q)[k, n] (+ bias[n])`` for INT4/INT8 group-wise
  codes. The decoded weight exists only as one ``K x NR`` panel per parallel column tile (computed under the
  column-tile loop and reused by every row tile), never as a ``K x N`` fp32 buffer.
* :func:`embedding_gather` — ``take(deq(table), ids, axis=0)`` decoding only the gathered rows.
* :func:`quantize_activations` — the run-time activation quantizer (per token or per tensor, dynamic or with a
  calibrated clip) producing ``uint8`` codes ``q + 128`` and the per-row scale.
* :func:`int8_matmul` — ``u8 x s8 → s32`` GEMM over the VNNI weight layout with the dequantize epilogue
  ``(acc - 128 * wsum[n]) * xs[m] * ws[n] + bias[n]``. On targets with AVX512-VNNI (or AVX-VNNI) the inner
  ``16 x 4`` (``8 x 4``) dot product is tensorized to ``vpdpbusd``; elsewhere it is plain vectorized int32 code.
* :func:`layernorm_quantize` — ``layer_norm(a (+ r))`` that also writes the per-token codes of the int8 GEMMs it
  feeds (the quantizer fused into its producer: no second pass over the normalized activations).

The row count ``m`` is symbolic, so one kernel serves every batch size / sequence length.
"""

from __future__ import annotations

import functools

import tvm
from tvm import s_tir, te, tirx

from ...schedules.cpu.common import num_vector_registers, vector_lanes

OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps neither fuses into nor out of the kernel


def _finish(sch: s_tir.Schedule, name: str) -> tirx.PrimFunc:
    # No global_symbol: the kernel is private to the module (dead-code elimination may drop it from modules that
    # do not call it, e.g. the weight-transform module built for a generic host); the GlobalVar names it.
    func = sch.mod["main"].without_attr("global_symbol")
    del name
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


def _rows():
    return tirx.Var("m", "int64")


def _i64(v: int):
    return tirx.IntImm("int64", int(v))


def _tile_cols(n: int, lanes: int) -> int:
    """Register-tile width: two vectors when N allows (more independent FMA chains), else one, else all of N."""
    for vecs in (2, 1):
        if n >= vecs * lanes:
            return vecs * lanes
    return n


def _vectorize_inner(sch, loop, lanes: int):
    ext = sch.get(loop).extent
    ext = int(ext.value) if isinstance(ext, tirx.IntImm) else None
    if ext is None or ext < 2:
        return
    if ext > lanes and ext % lanes == 0:
        outer, inner = sch.split(loop, factors=[None, lanes])
        sch.unroll(outer)
        sch.vectorize(inner)
    elif ext <= lanes and ext & (ext - 1) == 0:  # odd widths (<10 x float>) trip LLVM's type legalizer
        sch.vectorize(loop)


# -- weight-only ---------------------------------------------------------------------------------------------
def _decode(q, scales, zeros, bits: int, group: int, k_axis_first: bool):
    """fcompute of the dequantized weight: element (r, c) of the logical [R, C] matrix (packed along C)."""
    half = float(1 << (bits - 1))

    def deq(r, c):
        if bits == 4:
            byte = q[r, c // 2].astype("int32")
            code = (byte >> ((c % 2) * 4).astype("int32")) & 15
        else:
            code = q[r, c].astype("int32")
        gi = (r // group, c) if k_axis_first else (r, c // group)
        zero = zeros[gi].astype("float32") if zeros is not None else tirx.const(half, "float32")
        return (code.astype("float32") - zero) * scales[gi].astype("float32")

    return deq


def wo_row_tile(n: int, target) -> int:
    """Rows per register tile of the weight-only matmul (accumulators: rows x NR/lanes vectors ≤ 3/4 of the file)."""
    lanes = vector_lanes(target, "float32")
    nr = _tile_cols(n, lanes)
    return max(min(num_vector_registers(target) * 3 // 4 // max(nr // lanes, 1), 8), 1)


def pad_rows(k: int, row_tile: int, target):
    """x[m, K] → [ceil(m/R), R, K], the last tile's extra rows zero: the matmul then needs no bounds check."""
    m = _rows()
    rt = _i64(row_tile)
    x = te.placeholder((m, _i64(k)), "float32", name="x")
    xp = te.compute(((m + rt - 1) // rt, rt, _i64(k)),
                    lambda b, r, c: tirx.Select(b * rt + r < m, x[tirx.min(b * rt + r, m - 1), c],
                                                tirx.const(0.0, "float32")), name="padded")
    sch = s_tir.Schedule(te.create_prim_func([x, xp]))
    b, r, c = sch.get_loops(sch.get_sblock("padded"))
    _vectorize_inner(sch, c, vector_lanes(target, "float32"))
    return _finish(sch, "ember_pad_rows")


def weight_only_matmul(k: int, n: int, bits: int, group: int, symmetric: bool, has_bias: bool, target):
    """``x @ deq(qweight)[K, N] (+ bias)`` → ``[m, N]`` fp32, x given as row tiles ``[ceil(m/R), R, K]``
    (:func:`pad_rows`, R = :func:`wo_row_tile`). Arguments: xtiles, qweight, scales, [zeros], [bias].

    Whole register tiles keep the K loop free of bounds checks when ``m`` is symbolic, so the accumulators stay
    in registers (2.3x faster than a predicated tail on MiniLM's shapes).
    """
    g = k if group == -1 else group
    lanes = vector_lanes(target, "float32")
    nr = _tile_cols(n, lanes)
    mr = wo_row_tile(n, target)
    m = _rows()
    mb = tirx.Var("mb", "int64")
    tile = _i64(mr)
    x = te.placeholder((mb, tile, _i64(k)), "float32", name="xtiles")
    qw = te.placeholder((_i64(k), _i64((n + 1) // 2 if bits == 4 else n)), "uint8", name="qweight")
    sc = te.placeholder((_i64(k // g), _i64(n)), "float16", name="scales")
    zp = None if symmetric else te.placeholder((_i64(k // g), _i64(n)), "uint8", name="zeros")
    wd = te.compute((_i64(k), _i64(n)), _decode(qw, sc, zp, bits, g, True), name="dequant")
    r = te.reduce_axis((_i64(0), _i64(k)), name="k")
    y = te.compute((mb, tile, _i64(n)), lambda ib, ii, j: te.sum(x[ib, ii, r] * wd[r, j], axis=r), name="matmul")
    args = [x, qw, sc] + ([zp] if zp is not None else [])
    b = None
    if has_bias:
        b = te.placeholder((_i64(n),), "float32", name="bias")
        args.append(b)
    out = te.compute((m, _i64(n)), (lambda i, j: y[i // tile, i % tile, j] + b[j]) if b is not None
                     else (lambda i, j: y[i // tile, i % tile, j]), name="store")
    sch = s_tir.Schedule(te.create_prim_func(args + [out]))
    mm = sch.get_sblock("matmul")
    ib, ii, j, kr = sch.get_loops(mm)
    j_o, j_i = sch.split(j, factors=[None, nr])
    sch.reorder(j_o, ib, kr, ii, j_i)
    sch.parallel(j_o)
    sch.set_scope(mm, 0, "local")
    epi = sch.get_sblock("store")
    sch.reverse_compute_at(epi, ib, preserve_unit_loops=True)
    # The decoded panel: K x NR values per column tile, reused by every row tile below it.
    sch.compute_at(sch.get_sblock("dequant"), j_o, preserve_unit_loops=True)
    _vectorize_inner(sch, sch.get_loops(sch.get_sblock("dequant"))[-1], lanes)
    _vectorize_inner(sch, j_i, lanes)
    sch.unroll(ii)
    init = sch.decompose_reduction(mm, kr)
    _vectorize_inner(sch, sch.get_loops(init)[-1], lanes)
    _vectorize_inner(sch, sch.get_loops(epi)[-1], lanes)
    return _finish(sch, f"ember_wo{bits}_matmul")


def embedding_gather(v: int, d: int, bits: int, group: int, symmetric: bool, index_dtype: str, target):
    """``take(deq(table), ids, axis=0)`` for flat ``ids[t]`` → ``[t, D]``. Arguments: ids, qweight, scales, [zeros]."""
    g = d if group == -1 else group
    t = tirx.Var("t", "int64")
    ids = te.placeholder((t,), index_dtype, name="ids")
    qw = te.placeholder((_i64(v), _i64((d + 1) // 2 if bits == 4 else d)), "uint8", name="qweight")
    sc = te.placeholder((_i64(v), _i64(d // g)), "float16", name="scales")
    zp = None if symmetric else te.placeholder((_i64(v), _i64(d // g)), "uint8", name="zeros")
    deq = _decode(qw, sc, zp, bits, g, False)

    def row(i):  # out-of-range ids read row 0 / the last row rather than memory outside the table
        return tirx.max(tirx.min(ids[i].astype("int64"), _i64(v - 1)), _i64(0))

    out = te.compute((t, _i64(d)), lambda i, j: deq(row(i), j), name="gather")
    sch = s_tir.Schedule(te.create_prim_func([ids, qw, sc] + ([zp] if zp is not None else []) + [out]))
    blk = sch.get_sblock("gather")
    i, j = sch.get_loops(blk)
    sch.parallel(i)
    _vectorize_inner(sch, j, vector_lanes(target, "float32"))
    return _finish(sch, f"ember_wo{bits}_gather")


# -- INT8 activations ----------------------------------------------------------------------------------------
def quantize_activations(k: int, qmax: int, per_token: bool, static: bool, row_tile: int, target,
                         smooth: bool = False):
    """x[m, K] fp32 → (codes uint8 [ceil(m/R), R, Kp] = q + 128; scale fp32 [m]).

    smooth: an extra argument ``inv_smooth[K]`` multiplies x per input channel before quantizing (SmoothQuant:
    the weights were multiplied by the inverse at compile time, so the product is unchanged).

    The codes are zero-padded (value 128) to Kp = ceil(K/4)*4 columns and to whole tiles of R = ``row_tile``
    rows, so the int8 GEMM's register tiles never need a bounds check (which would also block tensorizing its
    inner dot product). Dynamic: the range is max |x| of the row (per token) or of the tensor. Static: a
    calibrated ``clip[1]`` argument gives the range (per tensor) or caps each row's range (per token).
    """
    m = _rows()
    kp = -(-k // 4) * 4
    x = te.placeholder((m, _i64(k)), "float32", name="x")
    args = [x]
    if smooth:
        inv = te.placeholder((_i64(k),), "float32", name="inv_smooth")
        args.append(inv)

        def xv(i, c):
            return x[i, c] * inv[c]
    else:
        def xv(i, c):
            return x[i, c]
    clip = None
    if static:
        clip = te.placeholder((_i64(1),), "float32", name="clip")
        args.append(clip)
    if static and not per_token:
        rng = te.compute((m,), lambda i: clip[0], name="range")
    elif per_token:
        lanes = vector_lanes(target, "float32")
        if k % lanes == 0 and k > lanes:
            # max |x| of a row as `lanes` partial maxima (one vector, reduced over K/lanes) then across the
            # vector: a vectorized reduction instead of a scalar loop over K (4x faster on MiniLM's rows).
            rk = te.reduce_axis((_i64(0), _i64(k // lanes)), name="k")
            part = te.compute((m, _i64(lanes)), lambda i, v: te.max(tirx.abs(xv(i, rk * lanes + v)), axis=rk),
                              name="rowmax_part")
            rv = te.reduce_axis((_i64(0), _i64(lanes)), name="v")
            rmax = te.compute((m,), lambda i: te.max(part[i, rv], axis=rv), name="rowmax")
        else:
            r = te.reduce_axis((_i64(0), _i64(k)), name="k")
            rmax = te.compute((m,), lambda i: te.max(tirx.abs(xv(i, r)), axis=r), name="rowmax")
        rng = te.compute((m,), (lambda i: tirx.min(rmax[i], clip[0])) if static else (lambda i: rmax[i]),
                         name="range")
    else:
        ri = te.reduce_axis((_i64(0), m), name="ri")
        rk = te.reduce_axis((_i64(0), _i64(k)), name="rk")
        tmax = te.compute((_i64(1),), lambda _: te.max(tirx.abs(xv(ri, rk)), axis=[ri, rk]), name="tensormax")
        rng = te.compute((m,), lambda i: tmax[0], name="range")
    safe = te.compute((m,), lambda i: tirx.max(rng[i], tirx.const(1e-12, "float32")), name="safe_range")
    qm = tirx.const(float(qmax), "float32")
    # One division per row, a multiply per element (the division per element cost as much as the rest).
    inv_row = te.compute((m,), lambda i: qm / safe[i], name="inv_scale")
    rt = _i64(row_tile)

    def code(b, r, c):
        row = b * rt + r
        rc = tirx.min(row, m - 1)
        # Clamp/select on the column only when K needs padding: an index like min(c, K-1) turns the vectorized
        # row load into a gather (10x slower on MiniLM's shapes).
        col = c if kp == k else tirx.min(c, _i64(k - 1))
        val = tirx.nearbyint(xv(rc, col) * inv_row[rc])
        val = tirx.max(tirx.min(val, qm), -qm).astype("int32") + 128
        inside = row < m if kp == k else tirx.all(c < _i64(k), row < m)
        return tirx.Select(inside, val, tirx.const(128, "int32")).astype("uint8")

    xq = te.compute(((m + rt - 1) // rt, rt, _i64(kp)), code, name="codes")
    xs = te.compute((m,), lambda i: safe[i] / qm, name="scale")
    sch = s_tir.Schedule(te.create_prim_func(args + [xq, xs]))
    lanes = vector_lanes(target, "float32")
    blk = sch.get_sblock("codes")
    b, r, c = sch.get_loops(blk)
    # Serial on purpose: a few microseconds of streaming work, less than waking the thread pool for a parallel
    # region costs (much less on a loaded machine).
    _vectorize_inner(sch, c, lanes)
    for name in ("safe_range", "range"):
        sch.compute_inline(sch.get_sblock(name))
    try:
        part_blk = sch.get_sblock("rowmax_part")
    except Exception:  # pylint: disable=broad-except  (scalar row max: K not a multiple of the vector)
        part_blk = None
    if part_blk is not None:
        i, v, kk = sch.get_loops(part_blk)
        sch.reorder(i, kk, v)
        sch.vectorize(v)
        init = sch.decompose_reduction(part_blk, kk)
        sch.vectorize(sch.get_loops(init)[-1])
    return _finish(sch, "ember_quantize_activations")


def _lane_reduce(m, k: int, lanes: int, value, red, name: str):
    """Per row of [m, K]: ``lanes`` partial reductions over K/lanes (one vector accumulator), then across the
    vector. Returns (partial tensor, row tensor); the caller schedules the partial block with
    :func:`_schedule_lane_reduce`."""
    rk = te.reduce_axis((_i64(0), _i64(k // lanes)), name=name + "_k")
    part = te.compute((m, _i64(lanes)), lambda i, v: red(value(i, rk * lanes + v), axis=rk), name=name + "_part")
    rv = te.reduce_axis((_i64(0), _i64(lanes)), name=name + "_v")
    row = te.compute((m,), lambda i: red(part[i, rv], axis=rv), name=name)
    return part, row


def _schedule_lane_reduce(sch, name: str, row_loop=None):
    blk = sch.get_sblock(name + "_part")
    if row_loop is not None:
        sch.compute_at(blk, row_loop, preserve_unit_loops=True)
    loops = sch.get_loops(blk)
    v, kk = loops[-2], loops[-1]
    sch.reorder(kk, v)
    sch.vectorize(v)
    init = sch.decompose_reduction(blk, kk)
    sch.vectorize(sch.get_loops(init)[-1])
    if row_loop is not None:
        sch.compute_at(sch.get_sblock(name), row_loop, preserve_unit_loops=True)


def layernorm_quantize(k: int, eps: float, residual: bool, qmax: int, row_tile: int, target):
    """``y = layer_norm(a (+ r))`` over the last axis, and y's dynamic per-token int8 codes for the next GEMM.

    The quantizer is fused into the producer: each row is normalized, its max |y| taken and its codes written while
    the row is in cache, instead of a second kernel that reads y back. Arguments: a [m, K], [r [m, K]], gamma [K],
    beta [K]; outputs: y fp32 [m, K] (still needed: it is the next residual), codes uint8 [ceil(m/R), R, Kp] and
    scale fp32 [m] exactly as :func:`quantize_activations` makes them. K must be a multiple of the fp32 vector.
    """
    lanes = vector_lanes(target, "float32")
    m = _rows()
    kp = -(-k // 4) * 4
    a = te.placeholder((m, _i64(k)), "float32", name="a")
    args = [a]
    if residual:
        r = te.placeholder((m, _i64(k)), "float32", name="r")
        args.append(r)
        xin = te.compute((m, _i64(k)), lambda i, c: a[i, c] + r[i, c], name="x")
    else:
        xin = a
    gamma = te.placeholder((_i64(k),), "float32", name="gamma")
    beta = te.placeholder((_i64(k),), "float32", name="beta")
    args += [gamma, beta]
    f32 = "float32"
    _, total = _lane_reduce(m, k, lanes, lambda i, c: xin[i, c], te.sum, "rowsum")
    mean = te.compute((m,), lambda i: total[i] * tirx.const(1.0 / k, f32), name="mean")
    _, sq = _lane_reduce(m, k, lanes, lambda i, c: (xin[i, c] - mean[i]) * (xin[i, c] - mean[i]),
                         te.sum, "rowsq")
    rstd = te.compute((m,), lambda i: tirx.const(1.0, f32) / tirx.sqrt(sq[i] * tirx.const(1.0 / k, f32)
                                                                        + tirx.const(eps, f32)), name="rstd")
    y = te.compute((m, _i64(k)), lambda i, c: (xin[i, c] - mean[i]) * rstd[i] * gamma[c] + beta[c], name="y")
    _, amax = _lane_reduce(m, k, lanes, lambda i, c: tirx.abs(y[i, c]), te.max, "rowmax")
    safe = te.compute((m,), lambda i: tirx.max(amax[i], tirx.const(1e-12, f32)), name="safe_range")
    qm = tirx.const(float(qmax), f32)
    inv = te.compute((m,), lambda i: qm / safe[i], name="inv_scale")
    rt = _i64(row_tile)

    def code(b, rr, c):
        row = b * rt + rr
        rc = tirx.min(row, m - 1)
        col = c if kp == k else tirx.min(c, _i64(k - 1))
        val = tirx.nearbyint(y[rc, col] * inv[rc])
        val = tirx.max(tirx.min(val, qm), -qm).astype("int32") + 128
        inside = row < m if kp == k else tirx.all(c < _i64(k), row < m)
        return tirx.Select(inside, val, tirx.const(128, "int32")).astype("uint8")

    xq = te.compute(((m + rt - 1) // rt, rt, _i64(kp)), code, name="codes")
    xs = te.compute((m,), lambda i: safe[i] / qm, name="scale")
    sch = s_tir.Schedule(te.create_prim_func(args + [y, xq, xs]))
    if residual:
        sch.compute_inline(sch.get_sblock("x"))  # a + r recomputed in each pass: cheaper than storing it
    for name in ("rowsum", "rowsq", "rowmax"):
        _schedule_lane_reduce(sch, name)
    for name in ("safe_range",):
        sch.compute_inline(sch.get_sblock(name))
    _vectorize_inner(sch, sch.get_loops(sch.get_sblock("y"))[-1], lanes)
    _vectorize_inner(sch, sch.get_loops(sch.get_sblock("codes"))[-1], lanes)
    return _finish(sch, "ember_layernorm_quantize")


# -- VNNI tensor intrinsic -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def vnni_intrinsic(lanes: int) -> str:
    """Register (once) and name the ``lanes x 4`` u8·s8 → s32 dot product as ``vpdpbusd`` (512 or 256 bits)."""
    from tvm.script import tirx as T

    name = f"ember_vnni_dot_{lanes}x4"
    llvm_name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
    vec_i32, vec_i8 = f"int32x{lanes}", f"int8x{lanes * 4}"

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((T.int64(4),), "uint8", offset_factor=1),
             b: T.Buffer((T.int64(lanes), T.int64(4)), "int8", offset_factor=1),
             c: T.Buffer((T.int64(lanes),), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i, kk in T.grid(T.int64(lanes), T.int64(4)):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, kk])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((T.int64(4),), "uint8", offset_factor=1),
             b: T.Buffer((T.int64(lanes), T.int64(4)), "int8", offset_factor=1),
             c: T.Buffer((T.int64(lanes),), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            # LLVM >= 20 types the byte operands of vpdpbusd as <4L x i8> (older LLVM: <L x i32>).
            a_word = T.reinterpret(a.vload([T.int64(0)], "uint8x4"), dtype="int32")  # 4 activation bytes
            a_vec = T.reinterpret(T.broadcast(a_word, lanes), dtype=vec_i8)
            b_vec = b.vload([T.int64(0), T.int64(0)], dtype=vec_i8)
            c[T.ramp(T.int64(0), T.int64(1), lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), c.vload([T.int64(0)], dtype=vec_i32), a_vec, b_vec,
                dtype=vec_i32)

    s_tir.TensorIntrin.register(name, desc, impl, override=True)
    return name


def int8_dot_inner(sch: s_tir.Schedule, blk, k_inner, j_inner, decompose_at, lanes: int, target) -> None:
    """The innermost u8 x s8 -> i32 step of an int8 GEMM-like block whose loops end in (..., ``k_inner`` = the 4
    bytes one dot product sums, ``j_inner`` = ``lanes`` output channels): ``vpdpbusd`` where the target has VNNI
    for that width, else int32 multiply-adds vectorized over the channels. The reduction init is split off at
    ``decompose_at`` and vectorized. (The loop annotations go before the decomposition: afterwards TVM no longer
    sees a complete reduction block.)"""
    use_vnni = vnni_lanes(target) == lanes
    if not use_vnni:
        sch.reorder(k_inner, j_inner)
        sch.unroll(k_inner)
        sch.vectorize(j_inner)
    init = sch.decompose_reduction(blk, decompose_at)
    sch.vectorize(sch.get_loops(init)[-1])
    if use_vnni:
        sch.tensorize(j_inner, vnni_intrinsic(lanes))


def vnni_lanes(target) -> int | None:
    """32-bit lanes of the target's VNNI dot product: 16 (AVX512-VNNI), 8 (AVX-VNNI), None (no VNNI)."""
    from tvm.target.codegen import target_has_features

    def has(f):
        try:
            return bool(target_has_features(f, target))
        except Exception:  # pylint: disable=broad-except
            return False

    if target is None or target.kind.name != "llvm":
        return None
    if has("avx512vnni") and has("avx512bw"):
        return 16
    if has("avxvnni"):
        return 8
    return None


def _gelu(v):
    """x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) as a vectorizable expression (libm's erff is a scalar call per
    element): erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7) with ember's vectorizable exp. Unlike
    fast_math.fast_erf it has no small-|x| Taylor branch (erf's relative accuracy near 0 does not matter inside
    1 + erf), which makes the epilogue a quarter cheaper."""
    from ...schedules.cpu.fast_math import fast_exp

    f32 = "float32"

    def c(val):
        return tirx.const(val, f32)

    x = tirx.Var("gelu_x", f32)
    z = tirx.Var("gelu_z", f32)  # |x| / sqrt 2
    t = tirx.Var("gelu_t", f32)
    poly = c(1.061405429)
    for coef in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = poly * t + c(coef)
    tail = tirx.Var("gelu_tail", f32)  # 1 - erf(|x| / sqrt 2); a Let: used twice, each Let may occur once
    # x/2 * (1 + erf(x/sqrt2)): for x >= 0 that is x/2 * (2 - tail), for x < 0 x/2 * tail
    body = x * c(0.5) * tirx.Select(x < c(0.0), tail, c(2.0) - tail)
    body = tirx.Let(tail, poly * t * fast_exp(-(z * z)), body)
    body = tirx.Let(t, c(1.0) / (c(1.0) + c(0.3275911) * z), body)
    body = tirx.Let(z, tirx.Max(x, -x) * c(0.7071067811865476), body)
    return tirx.Let(x, v, body)


def int8_lanes(target) -> int:
    """Output channels per weight-layout vector: the VNNI width, else one native int32 vector (at least 8)."""
    return vnni_lanes(target) or max(vector_lanes(target, "int32"), 8)


def int8_col_vecs(nb: int, lanes: int) -> int:
    """Output vectors per register tile of the int8 GEMM (a divisor of the N/L vectors)."""
    return 2 if nb % 2 == 0 else 1


def int8_row_tile(lanes: int) -> int:
    """Rows per register tile of the int8 GEMM (accumulators: rows x 2 vectors, 3/4 of the register file)."""
    return 8 if lanes == 16 else 4


def int8_matmul(k: int, n: int, lanes: int, has_bias: bool, target, activation: str | None = None,
                col_vecs: int | None = None):
    """codes [ceil(m/R), R, Kp] (u8) x packed s8 weights → fp32 [m, N] with the dequantize (+ bias) epilogue.

    activation="gelu": the exact (erf) GELU applied in the epilogue, with a vectorizable erf (fast_math).

    Arguments: codes, wpacked [N/L, Kp/4, L, 4], wsum [N/L*L] int32, xscale [m], wscale [N], [bias [N]].
    """
    kp = -(-k // 4) * 4
    nb = -(-n // lanes)
    rt = int8_row_tile(lanes)
    m = _rows()
    mb = tirx.Var("mb", "int64")
    xq = te.placeholder((mb, _i64(rt), _i64(kp)), "uint8", name="codes")
    wp = te.placeholder((_i64(nb), _i64(kp // 4), _i64(lanes), _i64(4)), "int8", name="wpacked")
    wsum = te.placeholder((_i64(nb * lanes),), "int32", name="wsum")
    xs = te.placeholder((m,), "float32", name="xscale")
    ws = te.placeholder((_i64(n),), "float32", name="wscale")
    ko = te.reduce_axis((_i64(0), _i64(kp // 4)), name="ko")
    ki = te.reduce_axis((_i64(0), _i64(4)), name="ki")
    acc = te.compute(
        (mb, _i64(rt), _i64(nb), _i64(lanes)),
        lambda ib, ii, jo, ji: te.sum(
            xq[ib, ii, ko * 4 + ki].astype("int32") * wp[jo, ko, ji, ki].astype("int32"), axis=[ko, ki]),
        name="acc")
    args = [xq, wp, wsum, xs, ws]
    b = None
    if has_bias:
        b = te.placeholder((_i64(n),), "float32", name="bias")
        args.append(b)

    def epilogue(i, j):
        v = (acc[i // rt, i % rt, j // lanes, j % lanes] - 128 * wsum[j]).astype("float32") * (xs[i] * ws[j])
        v = v + b[j] if b is not None else v
        return _gelu(v) if activation == "gelu" else v

    out = te.compute((m, _i64(n)), epilogue, name="dequant_epilogue")
    sch = s_tir.Schedule(te.create_prim_func(args + [out]))
    blk = sch.get_sblock("acc")
    ib, ii, jo, ji, kor, kir = sch.get_loops(blk)
    nv = col_vecs or int8_col_vecs(nb, lanes)
    jo_o, jo_i = sch.split(jo, factors=[None, nv])
    sch.reorder(jo_o, ib, kor, ii, jo_i, ji, kir)
    sch.parallel(jo_o)
    sch.set_scope(blk, 0, "local")
    epi = sch.get_sblock("dequant_epilogue")
    sch.reverse_compute_at(epi, ib, preserve_unit_loops=True)
    sch.unroll(ii)
    sch.unroll(jo_i)
    int8_dot_inner(sch, blk, kir, ji, kor, lanes, target)
    _vectorize_inner(sch, sch.get_loops(epi)[-1], vector_lanes(target, "float32"))
    return _finish(sch, "ember_int8_matmul")
