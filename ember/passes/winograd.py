"""Winograd convolution for 3x3 stride-1 conv2d on CPUs (Lavin & Gray's F(m x m, 3 x 3)).

A 3x3 stride-1 convolution computes each ``m x m`` output tile from an ``(m + 2) x (m + 2)`` input tile. Winograd's
minimal filtering algorithm does that with ``(m + 2)^2`` multiplies per (input channel, output channel) pair
instead of ``9 m^2``: F(2x2, 3x3) needs 16 instead of 36 (2.25x fewer), F(4x4, 3x3) 36 instead of 144 (4x).
The multiplies become one batched GEMM over the ``alpha x alpha`` tile positions (alpha = m + 2)::

    y = conv2d(x, w)          # x: NHWC [N, H, W, C], w: HWIO [3, 3, C, O], stride 1, dilation 1, groups 1
becomes
    u = G w G^T               # weight-only: [alpha, alpha, O/NR, C, NR], lifted and computed at compile time
    v = call_tir(winograd_input, (x,))      # v[a, b, p, c] = (B^T d_p B)[a, b]:  d_p the p-th padded input tile
    z = call_tir(winograd_gemm, (v, u))     # z[a, b, p, o] = sum_c v[a, b, p, c] * u[a, b, o // NR, c, o % NR]
    y = call_tir(winograd_output, (z,))     # y[n, h, w, o] = (A^T z_p A)[h % m, w % m]

Why these kernels:

* The GEMM is where the time goes; it is a batched matmul in exactly the form ember's CPU matmul rule
  (ember.schedules.cpu.matmul) tiles best: A rows (tiles) contiguous along C, the weight packed in NR-wide
  panels (``u[..., o // NR, c, o % NR]``, the layout pass's panel width for this shape).
* The transforms are pure data movement plus a few adds: the matrices are compile-time constants, so each
  output element is an unrolled sum over the non-zero coefficients only (no multiply by 0 or 1). Each kernel is
  marked so ember.schedules.cpu.winograd tiles it (the ``m x m`` / ``alpha x alpha`` tile positions unrolled,
  the channel axis vectorized). ``winograd_output`` is output-elementwise-fusable: the BatchNorm shift, ReLU
  and residual add that follow the conv fuse into it, as they would into the direct conv.
* The weight transform ``G w G^T`` is two einsums on the weight, lifted by ``LiftTransformParams``.

Which convs: NHWC/HWIO (after ember.passes.layout's conversion) 3x3, stride 1, dilation 1, groups 1, float32,
static shapes, with a weight (parameter-derived) kernel. Stride-2, dilated, grouped and 1x1 convs keep the
direct rule. Per layer, :func:`choose_tile` picks m (or declines) from the output size and channel counts,
from measurements on the 2-core AVX-512 Xeon (see BENCHMARKS.md, "Winograd"): on small images (14x14, 7x7)
F(2x2) beats F(4x4), whose (alpha/3)^2 = 4x larger transformed weight is read for too few tiles.

Opt-out: ``EMBER_WINOGRAD=0`` in the environment, the module switch ``ENABLED = False``, or
``layout_pass(target, winograd=False)``.

Numerics: F(2x2) is exact up to rounding of the sums; F(4x4)'s matrices hold 1/4, 1/6, 1/24 and 8, which
costs ~3e-6 error relative to the output scale in fp32 (F(2x2) ~4e-7; tests/passes/test_winograd.py compares
with torch at the suite's fp32 tolerance).
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .layout import _out_dtype, _static_int, dense_panel_width, emit_te_kernel, from_weight, plain_nhwc_conv

# Module switch (before/after measurements); the environment variable EMBER_WINOGRAD=0 also turns it off.
ENABLED = True

# TVM's op pattern kinds (include/tvm/relax/op_attr_types.h).
_INJECTIVE = 2
_OUT_EWISE_FUSABLE = 4

# Block names ember.schedules.cpu.winograd recognises (FuseTIR keeps block names), followed by "_m<m>".
INPUT_BLOCK = "ember_winograd_input"
OUTPUT_BLOCK = "ember_winograd_output"


def enabled() -> bool:
    return ENABLED and os.environ.get("EMBER_WINOGRAD", "1") not in ("0", "false", "off", "no")


# ------------------------------------------------------------------------------------------------- matrices
def matrices(m: int):
    """(A^T [m, alpha], G [alpha, 3], B^T [alpha, alpha]) of F(m, 3), float64; Lavin & Gray's choice of points
    (0, +-1, +-2, infinity) for m = 4, (0, +-1, infinity) for m = 2."""
    if m == 2:
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
        g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    elif m == 4:
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    else:
        raise ValueError(f"winograd tile m={m}: only 2 and 4 are supported")
    return np.array(at, "float64"), np.array(g, "float64"), np.array(bt, "float64")


def choose_tile(oh: int, ow: int, c: int, o: int) -> int | None:
    """The output tile m for a 3x3 stride-1 conv with an ``oh x ow`` output, ``c`` -> ``o`` channels, or None to
    keep the direct conv.

    From benchmarks/winograd_bench.py on the 2-core AVX-512 Xeon (times relative to the direct rule, one conv +
    bias + ReLU, batch 1; load 1.0 / load 4.5): 56x56x64 F2 0.87 / F4 0.73 (0.87 / 0.67); 28x28x128 0.75 / 0.62
    (0.51 / 0.40); 14x14x256 0.69 / 0.74 (0.62 / 0.66); 7x7x512 0.41 / 0.45 (0.50 / 1.00). F(4x4) wins where the image is large enough for many tiles; on small images its transformed
    weight (4x the direct one) is read for too few tiles, so F(2x2) (1.8x) is the better trade there.
    Below 8x8 the direct conv: the 7x7x512 layers are bound by their weight stream inside a whole model (ResNet-18's
    weights do not stay in cache between inferences here: ~7.5 GB/s from memory), and F(2x2)'s transformed
    weight is 16/9 of the direct one (16.8 vs 9.4 MB a layer); ResNet-18 b1 with those three convs direct:
    13.70 ms vs 14.72 (median, same run; the 1.0 / 0.41 above were measured with the weights in cache).
    """
    if c < 8 or o < 8:
        return None  # too few channels for the GEMM to dominate the transforms
    if min(oh, ow) < 8:
        return None  # few tiles: the weight stream, not the multiplies, is the cost (see above)
    return 4 if min(oh, ow) >= 20 else 2


# ------------------------------------------------------------------------------------------------- kernels
def _lin(terms):
    """sum(coef * value) over the non-zero coefficients, with +-1 as a plain add/subtract."""
    acc = None
    for coef, val in terms:
        if coef == 0:
            continue
        if coef == 1:
            t, neg = val, False
        elif coef == -1:
            t, neg = val, True
        else:
            t, neg = val * tirx.const(float(coef), "float32"), False
        if acc is None:
            acc = -t if neg else t
        else:
            acc = acc - t if neg else acc + t
    return acc if acc is not None else tirx.const(0.0, "float32")


def _select_chain(index, exprs):
    """exprs[index] for a small loop index as a Select chain: once the index's loop is unrolled the conditions are
    constants and the chain folds away."""
    out = exprs[-1]
    for i in range(len(exprs) - 2, -1, -1):
        out = tirx.Select(index == i, exprs[i], out)
    return out


def _input_te(x: te.Tensor, m: int, pad_top: int, pad_left: int, oh: int, ow: int):
    """v[a, b, p, c] = sum_{i,j} BT[a, i] d_p[i, j, c] BT[b, j], d_p the zero-padded (m+2)^2 input tile p.

    Separable, in two stages: ``t[a, j] = sum_i BT[a, i] d[i, j]`` (block ``..._rows``), then
    ``v[a, b] = sum_j BT[b, j] t[a, j]``. Each stage selects on one small index only (a chain of alpha short
    sums), so once the schedule unrolls it the expressions stay small -- one Select over both a and b would give
    every unrolled position the whole alpha^2-way chain, which took TVM's simplifier minutes for F(4x4)."""
    bt = matrices(m)[2]
    alpha = m + 2
    n, h, w, c = (int(d) for d in x.shape)
    th, tw = -(-oh // m), -(-ow // m)

    def rows(a, j, p, ch):
        bi = p // (th * tw)
        xx = (p % tw) * m + j - pad_left

        def d(i):
            yy = ((p // tw) % th) * m + i - pad_top
            inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
            return tirx.if_then_else(inside, x[bi, yy, xx, ch], tirx.const(0.0, "float32"))

        return _select_chain(a, [_lin([(bt[aa, i], d(i)) for i in range(alpha)]) for aa in range(alpha)])

    t = te.compute((alpha, alpha, n * th * tw, c), rows, name=f"{INPUT_BLOCK}_rows_m{m}")
    return te.compute((alpha, alpha, n * th * tw, c),
                      lambda a, b, p, ch: _select_chain(b, [_lin([(bt[bb, j], t[a, j, p, ch]) for j in range(alpha)])
                                                            for bb in range(alpha)]),
                      name=f"{INPUT_BLOCK}_m{m}")


def _gemm_te(v: te.Tensor, u: te.Tensor, o: int, nr: int):
    """z[a, b, p, o] = sum_c v[a, b, p, c] * u[a, b, o // NR, c, o % NR] (the packed batched GEMM)."""
    alpha, _, p, c = (int(d) for d in v.shape)
    k = te.reduce_axis((0, c), name="k")
    return te.compute((alpha, alpha, p, o),
                      lambda a, b, i, j: te.sum(v[a, b, i, k] * u[a, b, j // nr, k, j % nr], axis=k),
                      name="winograd_gemm")


def _output_te(z: te.Tensor, m: int, n: int, oh: int, ow: int):
    """y[n, h, w, o] = sum_{a,b} AT[h % m, a] z[a, b, p(n, h // m, w // m), o] AT[w % m, b].

    Separable like the input transform: ``s[i, b] = sum_a AT[i, a] z[a, b]`` (block ``..._cols``), then
    ``y[i, j] = sum_b AT[j, b] s[i, b]``."""
    at = matrices(m)[0]
    alpha = m + 2
    th, tw = -(-oh // m), -(-ow // m)
    o = int(z.shape[3])
    s = te.compute((m, alpha, int(z.shape[2]), o),
                   lambda i, b, p, ch: _select_chain(i, [_lin([(at[ii, a], z[a, b, p, ch]) for a in range(alpha)])
                                                         for ii in range(m)]),
                   name=f"{OUTPUT_BLOCK}_cols_m{m}")

    def body(bi, yy, xx, ch):
        p = (bi * th + yy // m) * tw + xx // m
        return _select_chain(xx % m, [_lin([(at[j, b], s[yy % m, b, p, ch]) for b in range(alpha)])
                                      for j in range(m)])

    return te.compute((n, oh, ow, o), body, name=f"{OUTPUT_BLOCK}_m{m}")


# ------------------------------------------------------------------------------------------------- the pass
@mutator
class _Winograd(PyExprMutator):
    def __init__(self, mod, target, choose):
        super().__init__(mod)
        self.target = target
        self.choose = choose
        self.weights = set()
        self.kernels = {}
        self.rewritten = []  # (input shape, weight shape, m) per rewritten conv

    def visit_function_(self, func):  # noqa: D401  (mutator hook)
        num_input = func.attrs.get("num_input", None) if func.attrs is not None else None
        if num_input is not None:
            self.weights = {p for p in list(func.params)[int(num_input):]}
        return super().visit_function_(func)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        return self._rewrite(call)

    def _rewrite(self, call):
        attrs = call.attrs
        x, w = call.args
        xs, ws = x.ty, w.ty
        if not plain_nhwc_conv(call):
            return call
        if [int(v) for v in attrs.strides] != [1, 1] or [int(v) for v in attrs.dilation] != [1, 1]:
            return call
        kh, kw, c, o = (_static_int(d) for d in ws.shape.values)
        n, ih, iw, ic = (_static_int(d) for d in xs.shape.values)
        if (kh, kw) != (3, 3) or None in (c, o, n, ih, iw, ic) or ic != c:
            return call
        out_dtype = _out_dtype(attrs, xs)
        if out_dtype != "float32" or str(xs.dtype) != "float32" or str(ws.dtype) != "float32":
            return call
        if not from_weight(self, w, self.weights):
            return call
        pt, pl, pb, pr = (int(v) for v in attrs.padding)
        oh, ow = ih + pt + pb - 2, iw + pl + pr - 2
        if oh < 1 or ow < 1:
            return call
        m = self.choose(oh, ow, c, o)
        if m is None:
            return call
        alpha = m + 2
        th, tw = -(-oh // m), -(-ow // m)
        p = n * th * tw
        nr = dense_panel_width(self.target, p, o)
        if o % nr:
            nr = o  # one panel: the rule then tiles N whole
        # u = G w G^T, [alpha, alpha, C, O] -> panels [alpha, alpha, O/NR, C, NR]: weight-only, lifted
        g = relax.const(matrices(m)[1].astype("float32"))
        u = self.builder_.emit(relax.op.einsum((g, w), "ai,ijco->ajco"))
        u = self.builder_.emit(relax.op.einsum((g, u), "bj,ajco->abco"))
        u = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(u, [alpha, alpha, c, o // nr, nr]),
                                                     [0, 1, 3, 2, 4]))
        key = (m, str(xs.shape), pt, pl, pb, pr)
        v = self.builder_.emit(emit_te_kernel(
            self.builder_, self.kernels, ("in",) + key, lambda xt: _input_te(xt, m, pt, pl, oh, ow), (x,), (),
            [alpha, alpha, p, c], "float32", "winograd_input", op_pattern=_INJECTIVE))
        z = self.builder_.emit(emit_te_kernel(
            self.builder_, self.kernels, ("gemm", alpha, p, c, o, nr), _gemm_te, (v, u), (o, nr),
            [alpha, alpha, p, o], "float32", "winograd_gemm"))
        self.rewritten.append((tuple(xs.shape.values), (3, 3, c, o), m))
        return emit_te_kernel(self.builder_, self.kernels, ("out", m, n, oh, ow, o),
                              lambda zt: _output_te(zt, m, n, oh, ow), (z,), (), [n, oh, ow, o], "float32",
                              "winograd_output")


@tvm.transform.module_pass(opt_level=0, name="ember.Winograd")
class Winograd:
    """Rewrite 3x3 stride-1 NHWC convs with a weight into Winograd F(m x m, 3 x 3) (see module docstring).
    ``choose(oh, ow, c, o) -> m | None`` picks the tile per layer (default :func:`choose_tile`)."""

    def __init__(self, target, choose=None):
        self.target = target
        self.choose = choose or choose_tile
        self.rewritten = []

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rw = _Winograd(mod, self.target, self.choose)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        self.rewritten = list(rw.rewritten)
        return rw.builder_.get()


__all__ = ["Winograd", "choose_tile", "matrices", "enabled", "ENABLED", "INPUT_BLOCK", "OUTPUT_BLOCK"]
