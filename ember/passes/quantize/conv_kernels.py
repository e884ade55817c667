"""TIR kernels of the INT8 convolution (NCHW input, OIHW weight, groups=1), scheduled for the CPU target.

Two kernels per conv layer (see :mod:`.conv` for the graph side and the numpy reference):

* :func:`quantize_pad_nhwc` — x fp32 ``[B, C, H, W]`` → codes uint8 ``[B, H+pt+pb, W+pl+pr, Cp]`` (``q + 128``,
  per-tensor scale, channels zero-padded to ``Cp = ceil(C/4)*4``, the spatial border already holding the code of
  0.0) and the scale ``[1]``. Dynamic: the scale is max |x| over the tensor at run time; static: a calibrated clip.
  One pass over x (the im2col matrix, KH*KW times larger, is never written).
* :func:`int8_conv2d` — implicit im2col GEMM: the accumulator of output pixel ``r = (b, oy, ox)`` and channel
  ``o`` is ``sum_{ky, kx, c} codes[b, oy*sy + ky*dy, ox*sx + kx*dx, c] * w[o, c, ky, kx]`` read straight from the
  padded NHWC codes: 4 consecutive channels are one 32-bit word, which is exactly the ``u8 x s8`` operand of
  ``vpdpbusd`` (the same VNNI micro-kernel as :func:`.kernels.int8_matmul`, weights in the same
  ``[N/L, K/4, L, 4]`` layout with K ordered (ky, kx, c)). Epilogue: ``(acc - 128 * wsum[o]) * xs * ws[o] + bias[o]``
  written straight in NCHW as ``[B, O, OH*OW]`` (row tiles never span two images, so each register tile's
  outputs are one box of the NCHW tensor): no transpose kernel after the conv.

The batch is symbolic: one kernel serves every batch size. Targets without VNNI get vectorized int32 code.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from ...schedules.cpu.common import vector_lanes
from .kernels import _finish, _i64, _vectorize_inner, int8_col_vecs, int8_dot_inner, int8_row_tile


def padded_channels(c: int) -> int:
    return -(-c // 4) * 4


def quantize_pad_nhwc(c: int, h: int, w: int, pads: tuple, qmax: int, static: bool, target):
    """x [B, C, H, W] fp32 (, clip [1]) → (codes [B, Hp, Wp, Cp] uint8, scale [1] fp32). pads: (top, left,
    bottom, right)."""
    pt, pl, pb, pr = pads
    cp = padded_channels(c)
    hp, wp = h + pt + pb, w + pl + pr
    b = tirx.Var("b", "int64")
    f32 = "float32"
    x = te.placeholder((b, _i64(c), _i64(h), _i64(w)), f32, name="x")
    args = [x]
    if static:
        clip = te.placeholder((_i64(1),), f32, name="clip")
        args.append(clip)
        rng = te.compute((_i64(1),), lambda _: clip[0], name="range")
    else:
        # max |x| as `lw` partial maxima along W (one vector register, contiguous loads), then across them: the
        # scalar reduction cost 4x the quantization itself on ResNet's 64x56x56 inputs.
        lw = max(v for v in (1, 2, 4, 8, 16, 32, 64) if v <= vector_lanes(target, f32) and w % v == 0)
        rb, rc = te.reduce_axis((_i64(0), b), "rb"), te.reduce_axis((_i64(0), _i64(c)), "rc")
        rh, rw = te.reduce_axis((_i64(0), _i64(h)), "rh"), te.reduce_axis((_i64(0), _i64(w // lw)), "rw")
        part = te.compute((_i64(lw),), lambda v: te.max(tirx.abs(x[rb, rc, rh, rw * _i64(lw) + v]),
                                                         axis=[rb, rc, rh, rw]), name="range_part")
        rv = te.reduce_axis((_i64(0), _i64(lw)), "rv")
        rng = te.compute((_i64(1),), lambda _: te.max(part[rv], axis=rv), name="range")
    safe = te.compute((_i64(1),), lambda _: tirx.max(rng[0], tirx.const(1e-12, f32)), name="safe_range")
    qm = tirx.const(float(qmax), f32)
    inv = te.compute((_i64(1),), lambda _: qm / safe[0], name="inv_scale")

    def code(n, y, xx, ch):
        iy, ix = y - _i64(pt), xx - _i64(pl)
        inside = tirx.all(ch < _i64(c), iy >= _i64(0), iy < _i64(h), ix >= _i64(0), ix < _i64(w))
        # Clamped indices: the border / padded channels read some valid element, then the Select drops it.
        v = x[n, tirx.min(ch, _i64(c - 1)), tirx.max(tirx.min(iy, _i64(h - 1)), _i64(0)),
              tirx.max(tirx.min(ix, _i64(w - 1)), _i64(0))]
        val = tirx.max(tirx.min(tirx.nearbyint(v * inv[0]), qm), -qm).astype("int32") + 128
        return tirx.Select(inside, val, tirx.const(128, "int32")).astype("uint8")

    codes = te.compute((b, _i64(hp), _i64(wp), _i64(cp)), code, name="codes")
    scale = te.compute((_i64(1),), lambda _: safe[0] / qm, name="scale")
    sch = s_tir.Schedule(te.create_prim_func(args + [codes, scale]))
    n, y, _, _ = sch.get_loops(sch.get_sblock("codes"))
    sch.parallel(sch.fuse(n, y))
    sch.compute_inline(sch.get_sblock("safe_range"))
    if static:
        sch.compute_inline(sch.get_sblock("range"))
    else:
        part = sch.get_sblock("range_part")
        v, rb_, rc_, rh_, rw_ = sch.get_loops(part)
        sch.reorder(rb_, rc_, rh_, rw_, v)
        if sch.get(v).extent.value > 1:
            sch.vectorize(v)
        init = sch.decompose_reduction(part, rb_)
        if sch.get(sch.get_loops(init)[-1]).extent.value > 1:
            sch.vectorize(sch.get_loops(init)[-1])
    return _finish(sch, "ember_conv_quantize")


def int8_conv2d(c: int, h: int, w: int, n: int, kernel: tuple, strides: tuple, dilation: tuple, pads: tuple,
                lanes: int, has_bias: bool, target, activation: str | None = None):
    """codes [B, Hp, Wp, Cp] (from :func:`quantize_pad_nhwc`) ⊛ packed s8 weights → fp32 [B, N, OH*OW].
    activation="relu": max(y, 0) in the epilogue.

    Arguments: codes, wpacked [N/L, KH*KW*Cp/4, L, 4], wsum [N/L*L] int32, xscale [1], wscale [N], [bias [N]].
    """
    pt, pl, pb, pr = pads
    kh, kw = kernel
    sy, sx = strides
    dy, dx = dilation
    cp = padded_channels(c)
    c4 = cp // 4
    hp, wp = h + pt + pb, w + pl + pr
    oh = (hp - dy * (kh - 1) - 1) // sy + 1
    ow = (wp - dx * (kw - 1) - 1) // sx + 1
    nb = -(-n // lanes)
    rt = int8_row_tile(lanes)
    b = tirx.Var("b", "int64")
    pix = oh * ow
    tiles = -(-pix // rt)  # row tiles per image: a tile never spans two images, so its outputs are one NCHW box
    xq = te.placeholder((b, _i64(hp), _i64(wp), _i64(cp)), "uint8", name="codes")
    wpk = te.placeholder((_i64(nb), _i64(kh * kw * c4), _i64(lanes), _i64(4)), "int8", name="wpacked")
    wsum = te.placeholder((_i64(nb * lanes),), "int32", name="wsum")
    xs = te.placeholder((_i64(1),), "float32", name="xscale")
    ws = te.placeholder((_i64(n),), "float32", name="wscale")
    ry = te.reduce_axis((_i64(0), _i64(kh)), name="ky")
    rx = te.reduce_axis((_i64(0), _i64(kw)), name="kx")
    rc = te.reduce_axis((_i64(0), _i64(c4)), name="kc")
    ri = te.reduce_axis((_i64(0), _i64(4)), name="ki")

    def acc_f(img, tb, ii, jo, ji):
        # The last tile's extra rows recompute the image's last pixel (never stored): no bounds check in the K loop.
        p = tirx.min(tb * _i64(rt) + ii, _i64(pix - 1))
        oy, ox = p // _i64(ow), p % _i64(ow)
        a = xq[img, oy * _i64(sy) + ry * _i64(dy), ox * _i64(sx) + rx * _i64(dx), rc * _i64(4) + ri]
        wv = wpk[jo, (ry * _i64(kw) + rx) * _i64(c4) + rc, ji, ri]
        return te.sum(a.astype("int32") * wv.astype("int32"), axis=[ry, rx, rc, ri])

    acc = te.compute((b, _i64(tiles), _i64(rt), _i64(nb), _i64(lanes)), acc_f, name="acc")
    args = [xq, wpk, wsum, xs, ws]
    bias = None
    if has_bias:
        bias = te.placeholder((_i64(n),), "float32", name="bias")
        args.append(bias)

    def epilogue(img, j, p):
        v = acc[img, p // _i64(rt), p % _i64(rt), j // _i64(lanes), j % _i64(lanes)] - 128 * wsum[j]
        v = v.astype("float32") * (xs[0] * ws[j])
        v = v + bias[j] if bias is not None else v
        return tirx.max(v, tirx.const(0.0, "float32")) if activation == "relu" else v

    # NCHW output ([B, N, OH*OW]; the graph views it as [B, N, OH, OW]): no transpose kernel after the conv.
    out = te.compute((b, _i64(n), _i64(pix)), epilogue, name="dequant_epilogue")
    sch = s_tir.Schedule(te.create_prim_func(args + [out]))
    blk = sch.get_sblock("acc")
    img, tb, ii, jo, ji, ky, kx, kc, ki = sch.get_loops(blk)
    nv = int8_col_vecs(nb, lanes)
    jo_o, jo_i = sch.split(jo, factors=[None, nv])
    sch.reorder(jo_o, img, tb, ky, kx, kc, ii, jo_i, ji, ki)
    sch.set_scope(blk, 0, "local")
    epi = sch.get_sblock("dequant_epilogue")
    sch.reverse_compute_at(epi, tb, preserve_unit_loops=True)
    # Parallel over (column tile, image, row tile) together: convs with few output channels (16, 32) have one or
    # two column tiles, and the row tiles of one thread's share stay on the same weight panel.
    sch.parallel(sch.fuse(jo_o, img, tb))
    sch.unroll(ii)
    sch.unroll(jo_i)
    int8_dot_inner(sch, blk, ki, ji, ky, lanes, target)
    if pix % rt == 0:  # whole tiles: the epilogue's pixel loop has no bounds predicate and vectorizes
        _vectorize_inner(sch, sch.get_loops(epi)[-1], vector_lanes(target, "float32"))
    return _finish(sch, "ember_int8_conv2d")
