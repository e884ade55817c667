"""CPU data layouts chosen before legalization, so weight re-layouts run once at compile time.

``layout_pass(target)`` runs in ``pipeline.prepare`` before ``LiftTransformParams``: every transform of a weight
it inserts (a transpose, a reshape into blocks) depends on weights alone, is lifted into
``main_transform_params`` and is computed once when the model is compiled; the artifact stores the weights
already in the new layout. For non-CPU targets it is the identity.

1. **conv2d → NHWC activations, HWIO weights** (:func:`conv_to_nhwc`, TVM's ``ConvertLayout``)::

       y = conv2d(x, w)                                 # x: NCHW, w: OIHW
   becomes
       xt = layout_transform(x, NCHW -> NHWC)           # once, at the model input
       wt = layout_transform(w, OIHW -> HWIO)           # weight-only: lifted, computed at compile time
       y  = conv2d(xt, wt, data_layout="NHWC", kernel_layout="HWIO")
       ... BN / ReLU / residual adds / pooling stay in NHWC; one transform back where NCHW is needed

   Why: with the output channels innermost, a conv is a GEMM whose N axis is the channel axis (64..512 wide in
   a ResNet) for every layer, and both the weight row ``w[ky, kx, c, :]`` and the output ``y[n, y, x, :]`` are
   contiguous along it. In NCHW the contiguous output axis is the image width, only 7 or 14 pixels in the deep
   layers -- too narrow to fill AVX-512 registers.

2. **dense weights packed into column panels** (:class:`PackWeights`)::

       y = matmul(x, w)                                  # x: [..., K], w: [K, N] a weight
   becomes
       wp = permute_dims(reshape(w, [K, N/NR, NR]), [1, 0, 2])     # [N/NR, K, NR]: lifted, compile time
       y  = call_tir(packed_dense, (x, wp))              # y[..., n] = sum_k x[..., k] * wp[n // NR, k, n % NR]

   NR is the register tile width the CPU matmul rule picks for the target (two or more SIMD vectors); the rule
   recognises the ``n // NR, n % NR`` read and tiles N by exactly NR, so the K x NR panel each register tile
   streams through is contiguous in memory (one sequential read instead of K rows ``4 N`` bytes apart).
   Epilogues (bias, GELU, residual add) still fuse: the kernel is annotated output-elementwise-fusable like a
   matmul. Only matmuls whose second operand is computed from weights and constants alone (a parameter after
   ``num_input``, its transpose, a weight with BatchNorm folded in) and whose N is a multiple of NR are packed.

3. **conv2d weights packed the same way** (same class): after 1, an NHWC conv with a weight ``w[ky, kx, c, o]``
   becomes ``call_tir(packed_conv2d_nhwc, (x, wp))`` with ``wp = w`` as ``[O/NR, KH, KW, C, NR]``: the panel a
   register tile of output channels reads is contiguous (``KH*KW*C*NR`` floats) instead of ``KH*KW*C`` rows
   ``4 O`` bytes apart -- for a 3x3x512x512 layer that is 144 pages instead of 2304 per panel, which was the
   difference between 12 and ~100 GFLOP/s per core. Padding is a separate stage inside the same kernel.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..schedules.cpu.common import is_cpu
from .relax_util import is_call

# Relax leaves that are compile-time values (TVM 0.27 names: tvm.ir.expr.Constant, ShapeExpr, prim_value()).
_LEAF_CONSTANTS = (tvm.ir.expr.Constant, type(relax.ShapeExpr([1])), type(relax.prim_value(1)))

# Module switches for before/after measurements (layout_pass's defaults); both on in normal use.
PACK_DENSE = True
PACK_CONV = True

# TVM's op pattern kinds (include/tvm/relax/op_attr_types.h): kOutEWiseFusable lets FuseOps attach the
# elementwise ops that follow (bias, activation, residual add) to the kernel, as it does for matmul.
_OUT_EWISE_FUSABLE = 4


def _has_conv2d(mod: tvm.IRModule) -> bool:
    found = []

    def _visit(expr):
        if is_call(expr, "relax.nn.conv2d"):
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, _visit)
    return bool(found)


def conv_to_nhwc() -> tvm.transform.Pass:
    """conv2d in NHWC with HWIO weights (see module docstring, 1).

    Runs TVM's ``ConvertLayout`` only on modules that have a conv2d: on graphs without one it gains nothing and
    can abort (the ONNX export of all-MiniLM-L6-v2: "Cannot convert when exactly one of the layouts is unknown").
    Where it fails on a graph with convs, the convs stay NCHW, which the CPU rules also schedule (slower, correct).
    """
    convert = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})

    @tvm.transform.module_pass(opt_level=0, name="ember.ConvToNHWC")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not _has_conv2d(mod):
            return mod
        try:
            return convert(mod)
        except tvm.error.InternalError:
            return mod

    return _pass


def dense_panel_width(target, m, n: int, dtype: str = "float32") -> int:
    """NR: the register tile width the CPU matmul rule picks for this product on ``target`` (m: rows, None if
    symbolic)."""
    from ..schedules.cpu.matmul import panel_width  # pylint: disable=import-outside-toplevel

    return panel_width(m, n, target, dtype)


def layout_pass(target, *, nhwc: bool = True, pack_dense: bool | None = None,
                pack_conv: bool | None = None, winograd: bool | None = None) -> tvm.transform.Pass:
    """The layout passes for ``target``: the rewrites chosen on CPUs, the identity elsewhere.
    ``pack_dense`` / ``pack_conv`` default to the module switches PACK_DENSE / PACK_CONV; ``winograd`` (3x3
    stride-1 convs as Winograd F(m x m, 3 x 3), ember.passes.winograd; needs ``nhwc``) to
    ``ember.passes.winograd.enabled()`` (off with EMBER_WINOGRAD=0)."""
    if target is None or not is_cpu(target):
        return tvm.transform.Sequential([], name="ember.layout(identity)")
    from . import winograd as _winograd  # pylint: disable=import-outside-toplevel  (it imports this module)

    pack_dense = PACK_DENSE if pack_dense is None else pack_dense
    pack_conv = PACK_CONV if pack_conv is None else pack_conv
    winograd = _winograd.enabled() if winograd is None else winograd
    passes = [conv_to_nhwc()] if nhwc else []
    if nhwc and winograd:
        # before PackWeights: the convs it rewrites are no longer conv2d ops there; the others get packed
        passes.append(_winograd.Winograd(target))
    if pack_dense or pack_conv:
        passes.append(PackWeights(target, dense=pack_dense, conv=pack_conv))
    return tvm.transform.Sequential(passes, name="ember.layout")


# ------------------------------------------------------------------------------------------------ dense packing
def _packed_dense_te(x: te.Tensor, wp: te.Tensor, n: int, nr: int, out_dtype: str):
    k = te.reduce_axis((0, wp.shape[1]), name="k")

    def body(*idx):
        j = idx[-1]
        a = x[(*idx[:-1], k)]
        b = wp[j // nr, k, j % nr]
        if str(a.dtype) != out_dtype:
            a, b = a.astype(out_dtype), b.astype(out_dtype)
        return te.sum(a * b, axis=k)

    return te.compute((*x.shape[:-1], n), body, name="packed_dense")


def _packed_conv2d_nhwc_te(x: te.Tensor, wp: te.Tensor, f: int, nr: int, strides, dilation, padding,
                           out_dtype: str):
    """y[n, oy, ox, o] = sum_{ky, kx, c} pad(x)[n, oy*sh + ky*dh, ox*sw + kx*dw, c] * wp[o // NR, ky, kx, c, o % NR]"""
    from tvm import topi  # pylint: disable=import-outside-toplevel

    _, kh, kw, c, _ = (int(d) for d in wp.shape)
    pt, pl, pb, pr = padding
    if any(padding):
        x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, 0], name="pad")
    n, ph, pw, _ = x.shape
    oh = (int(ph) - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (int(pw) - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, c), name="rc")

    def body(b, oy, ox, o):
        a = x[b, oy * strides[0] + ry * dilation[0], ox * strides[1] + rx * dilation[1], rc]
        w = wp[o // nr, ry, rx, rc, o % nr]
        if str(a.dtype) != out_dtype:
            a, w = a.astype(out_dtype), w.astype(out_dtype)
        return te.sum(a * w, axis=[ry, rx, rc])

    return te.compute((n, oh, ow, f), body, name="packed_conv2d_nhwc")


def _out_dtype(attrs, x_type) -> str:
    """The op's out_dtype attribute, or the input dtype where it is unset (None / "" / "void")."""
    dt = getattr(attrs, "out_dtype", None)
    dt = "" if dt is None else str(dt)
    return str(x_type.dtype) if dt in ("", "void", "None") else dt


def _static_int(e):
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def plain_nhwc_conv(call) -> bool:
    """An ungrouped conv2d in NHWC/HWIO (NHWC out) with a 4-D input and known shapes: the convolutions ember's CPU
    conv kernels (packed direct, Winograd) take."""
    attrs = call.attrs
    xs, ws = call.args[0].ty, call.args[1].ty
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NHWC", "HWIO", "NHWC"):
        return False
    return int(attrs.groups) == 1 and ws.shape is not None and xs.shape is not None and xs.ndim == 4


def from_weight(mutator, expr, weights, depth=0) -> bool:
    """Whether ``expr`` is computed from weights and constants alone (a weight, its transpose, a weight with
    BatchNorm folded in, ...): then its re-layout is lifted to compile time with the rest. ``mutator``: the
    PyExprMutator visiting the function (for its bindings); ``weights``: the function's weight parameters."""
    if depth > 32:
        return False
    if isinstance(expr, _LEAF_CONSTANTS):
        return True
    if isinstance(expr, relax.Var):
        if any(expr.same_as(w) for w in weights):
            return True
        bound = mutator.lookup_binding(expr)
        return bound is not None and from_weight(mutator, bound, weights, depth + 1)
    if isinstance(expr, relax.Tuple):
        return all(from_weight(mutator, f, weights, depth + 1) for f in expr.fields)
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return bool(expr.args) and all(from_weight(mutator, a, weights, depth + 1) for a in expr.args)
    return False


def emit_te_kernel(builder, kernels: dict, key, te_func, args, te_args, out_shape, out_dtype, name,
                   op_pattern: int = _OUT_EWISE_FUSABLE):
    """call_tir of ``te_func(*placeholders of args, *te_args)``: one PrimFunc per distinct ``key`` (shape), kept
    in ``kernels``, marked with ``op_pattern`` (default: output-elementwise-fusable, like a matmul)."""
    # Symbolic dims (a dynamic batch: ``x`` is ``(batch * 16, 64)``) that no buffer dim binds by itself reach
    # the kernel as scalar arguments after the tensors, the form LegalizeOps gives TVM's own kernels and
    # FuseTIR understands; every call site passes them (``key`` holds the argument shapes, so a reused
    # kernel always sees the same symbolic vars).
    free = []
    for a in args:
        for d in a.ty.shape.values:
            if isinstance(d, tirx.Var):
                continue  # bound by the buffer itself
            for v in tirx.analysis.undefined_vars(d, []):
                if not any(v.same_as(f) for f in free):
                    free.append(v)
    gv = kernels.get(key)
    if gv is None:
        holders = [te.placeholder(list(a.ty.shape.values), str(a.ty.dtype), name=f"arg{i}")
                   for i, a in enumerate(args)]
        out = te_func(*holders, *te_args)
        prim = te.create_prim_func([*holders, *free, out], index_dtype_override="int64")
        # private (no global_symbol), like call_te's kernels: once FuseTIR has merged it into its fused
        # kernel, dead-code elimination drops it instead of compiling an unused public copy
        prim = prim.without_attr("global_symbol")
        # the op pattern FuseOps sees (AnnotateTIROpPattern keeps an existing op_pattern)
        gv = builder.add_func(prim.with_attr("op_pattern", op_pattern), name)
        kernels[key] = gv
    return relax.call_tir(gv, [*args, *(relax.prim_value(v) for v in free)], relax.TensorType(out_shape, out_dtype))


@mutator
class _PackWeights(PyExprMutator):
    def __init__(self, mod, nr_of, dense=True, conv=True):
        super().__init__(mod)
        self.nr_of = nr_of
        self.dense, self.conv = dense, conv
        self.weights = set()
        self.packed = 0
        self.kernels = {}  # (x shape, n, nr, dtypes) -> GlobalVar: one PrimFunc per distinct shape, not per layer

    def visit_function_(self, func):  # noqa: D401  (mutator hook)
        num_input = func.attrs.get("num_input", None) if func.attrs is not None else None
        if num_input is not None:
            self.weights = {p for p in list(func.params)[int(num_input):]}
        return super().visit_function_(func)

    def _from_weight(self, expr) -> bool:
        return from_weight(self, expr, self.weights)

    def _emit_kernel(self, key, te_func, args, te_args, out_shape, out_dtype, name):
        return emit_te_kernel(self.builder_, self.kernels, key, te_func, args, te_args, out_shape, out_dtype, name)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d" and self.conv:
            return self._conv2d(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul") or not self.dense:
            return call
        x, w = call.args
        xs, ws = x.ty, w.ty
        if not isinstance(ws, relax.TensorType) or ws.ndim != 2 or not isinstance(xs, relax.TensorType):
            return call
        if xs.ndim < 1 or ws.shape is None or xs.shape is None:
            return call
        k, n = (_static_int(d) for d in ws.shape.values)
        if k is None or n is None or _static_int(xs.shape.values[-1]) != k:
            return call
        out_dtype = _out_dtype(call.attrs, xs)
        if "float" not in out_dtype or not self._from_weight(w):
            return call
        m = 1
        for d in xs.shape.values[:-1]:
            m = m * _static_int(d) if (m is not None and _static_int(d) is not None) else None
        nr = self.nr_of(m, n, out_dtype)
        if n % nr or n <= nr:
            return call
        wp = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, [k, n // nr, nr]), [1, 0, 2]))
        self.packed += 1
        key = ("dense", str(xs.shape), str(xs.dtype), str(ws.dtype), n, nr, out_dtype)
        return self._emit_kernel(key, _packed_dense_te, (x, wp), (n, nr, out_dtype),
                                 list(xs.shape.values[:-1]) + [n], out_dtype, "packed_dense")

    def _conv2d(self, call):
        """NHWC/HWIO conv2d with a weight -> call_tir(packed_conv2d_nhwc, (x, wp)) (see module docstring, 3)."""
        attrs = call.attrs
        x, w = call.args
        xs, ws = x.ty, w.ty
        if not plain_nhwc_conv(call):
            return call
        kh, kw, c, f = (_static_int(d) for d in ws.shape.values)
        ih, iw, ic = (_static_int(d) for d in xs.shape.values[1:])
        if None in (kh, kw, c, f, ih, iw, ic) or ic != c:
            return call
        out_dtype = _out_dtype(attrs, xs)
        if "float" not in out_dtype or not self._from_weight(w):
            return call
        strides = [int(v) for v in attrs.strides]
        dilation = [int(v) for v in attrs.dilation]
        padding = [int(v) for v in attrs.padding]  # top, left, bottom, right
        oh = (ih + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (iw + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
        nr = self.nr_of(ow, f, out_dtype)
        if f % nr or f <= nr:
            return call
        wp = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, [kh, kw, c, f // nr, nr]), [3, 0, 1, 2, 4]))
        self.packed += 1
        geom = (tuple(strides), tuple(dilation), tuple(padding))
        key = ("conv2d", str(xs.shape), str(xs.dtype), str(ws.shape), nr, out_dtype, geom)
        out_shape = [xs.shape.values[0], oh, ow, f]
        return self._emit_kernel(key, _packed_conv2d_nhwc_te, (x, wp), (f, nr, strides, dilation, padding, out_dtype),
                                 out_shape, out_dtype, "packed_conv2d_nhwc")


@tvm.transform.module_pass(opt_level=0, name="ember.PackWeights")
class PackWeights:
    """Pack the weights of dense layers and NHWC convs into NR-wide panels (see module docstring, 2 and 3).
    The kernels are named ``packed_dense*`` / ``packed_conv2d_nhwc*``: ember.passes.fusion recognises them as
    matmul/conv cores by those names, so keep them."""

    def __init__(self, target, dense: bool = True, conv: bool = True):
        self.target = target
        self.dense, self.conv = dense, conv

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        packer = _PackWeights(mod, lambda m, n, dtype: dense_panel_width(self.target, m, n, dtype), self.dense,
                            self.conv)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gv, packer.visit_expr(func))
        return packer.builder_.get()


__all__ = ["layout_pass", "conv_to_nhwc", "PackWeights", "dense_panel_width"]
