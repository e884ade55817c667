"""The x86 sparse matmul for many input rows (prefill, seq 128, convolution-like batches): no gather.

The gather kernel (:func:`.sparse_matmul._gather_kernel`) vectorizes across 16 output features and gathers x by
index — right for one input row (decode), where the weights are the traffic. With many rows the work is the
multiply-adds, and a gather (~10 cycles for 16 lanes) costs far more than the FMA it feeds. Here the vector runs
across 16 input rows instead: with ``xt = x^T`` (``[K, B]``, one transpose per call), a kept weight ``(j, k)``
multiplies the contiguous ``xt[k, b0 : b0 + 16]`` — one broadcast, one vector load, one FMA into feature j's
accumulator; 16 features are accumulated at once (AVX2: 8), and the result is written transposed, ``yt[j, b0:]``.

Relax around it (the rewrite emits it when x has a static row count ≥ ``MIN_ROWS``)::

    xt = R.permute_dims(x2, [1, 0])
    yt = R.call_tir(ember_sparse_matmul_rows_..., (xt, values, indices[, scales]), R.Tensor((N, B), "float32"))
    y2 = R.permute_dims(yt, [1, 0])

It reads the same packed layout as the gather kernel (:func:`.pack.pack` / :func:`.pack.pack_int8`).
"""

from __future__ import annotations

from tvm import tirx

from .pack import BLOCK, index_bits, index_rows, num_blocks, num_groups

MIN_ROWS = 16  # below one vector of rows the gather kernel is the better one


def rows_kernel(k: int, n_out: int, n: int, m: int, rows: int, isa: str, parallel: bool,
                int8: bool = False) -> tirx.PrimFunc:
    """``yt[j, b] = Σ value(j, g, s) * xt[g*m + pos(j, g, s), b]`` for a static number of rows ``rows``."""
    from tvm.script import tirx as T

    width = 16 if isa == "avx512" else 8  # input rows per vector
    cp = 16 if isa == "avx512" else 8     # features per pass: one accumulator register each
    passes = BLOCK // cp
    g_all = num_groups(k, m)
    gi_rows = index_rows(g_all, m)
    four_bit = index_bits(m) == 4
    nb = num_blocks(n_out)
    tiles, tail = rows // width, rows % width
    guard_row = nb * BLOCK != n_out

    def row_ok(r):
        return r < n_out if guard_row else T.bool(True)

    def column(indices, jb, g, s, c):
        if four_bit:
            byte = T.Cast("int32", indices[jb, g // 2, s, c])
            return g * m + T.bitwise_and(T.shift_right(byte, (g % 2) * 4), 15)
        return g * m + T.Cast("int32", indices[jb, g, s, c])

    def make_tile(lanes):
        vt = f"float32x{lanes}" if lanes > 1 else "float32"  # a 1-wide tail is scalar code

        def bcast(v):
            return T.Broadcast(v, lanes) if lanes > 1 else v

        def ramp(base):
            return T.Ramp(base, 1, lanes) if lanes > 1 else base

        @T.macro
        def tile(xt, values, indices, scales, yt, jb, hpass, b0):
            acc = T.decl_buffer((cp,), vt, scope="local")
            for ci in T.unroll(cp):
                acc[ci] = bcast(T.float32(0))
            vf = T.decl_buffer((cp,), "float32", scope="local")
            for g in range(g_all):
                for s in range(n):
                    if int8:  # the cp codes converted at once (one vpmovsxbd + vcvtdq2ps), then broadcast
                        vf[T.Ramp(0, 1, cp)] = T.Cast(f"float32x{cp}", values[jb, g, s, T.Ramp(hpass * cp, 1, cp)])
                    for ci in T.unroll(cp):
                        acc[ci] = acc[ci] + bcast(vf[ci] if int8 else values[jb, g, s, hpass * cp + ci]) \
                            * xt[column(indices, jb, g, s, hpass * cp + ci), ramp(b0)]
            for ci in T.unroll(cp):
                if row_ok(jb * BLOCK + hpass * cp + ci):
                    if int8:
                        yt[jb * BLOCK + hpass * cp + ci, ramp(b0)] = acc[ci] * bcast(
                            scales[jb * BLOCK + hpass * cp + ci])
                    else:
                        yt[jb * BLOCK + hpass * cp + ci, ramp(b0)] = acc[ci]

        return tile

    tile_main = make_tile(width)
    tile_tail = make_tile(tail) if tail else None

    @T.macro
    def body(xt, values, indices, scales, yt):
        for jb in T.parallel(nb) if parallel else T.serial(nb):
            for hpass in range(passes):
                for t in range(tiles):
                    tile_main(xt, values, indices, scales, yt, jb, hpass, t * width)
                if tail > 0:
                    tile_tail(xt, values, indices, scales, yt, jb, hpass, tiles * width)

    if int8:
        @T.prim_func(private=True)
        def kernel_int8(x_h: T.handle, v_h: T.handle, i_h: T.handle, s_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xt = T.match_buffer(x_h, (k, rows), "float32")
            values = T.match_buffer(v_h, (nb, g_all, n, BLOCK), "int8")
            indices = T.match_buffer(i_h, (nb, gi_rows, n, BLOCK), "uint8")
            scales = T.match_buffer(s_h, (nb * BLOCK,), "float32")
            yt = T.match_buffer(y_h, (n_out, rows), "float32")
            body(xt, values, indices, scales, yt)

        return kernel_int8

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, v_h: T.handle, i_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xt = T.match_buffer(x_h, (k, rows), "float32")
        values = T.match_buffer(v_h, (nb, g_all, n, BLOCK), "float32")
        indices = T.match_buffer(i_h, (nb, gi_rows, n, BLOCK), "uint8")
        yt = T.match_buffer(y_h, (n_out, rows), "float32")
        body(xt, values, indices, values, yt)

    return kernel
