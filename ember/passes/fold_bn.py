"""Fold inference-mode BatchNorm into the convolution that feeds it.

Both frontends import ``Conv2d -> BatchNorm2d`` as ``R.nn.batch_norm`` over a conv's output (torch.export keeps
``_native_batch_norm_legit_no_training``; an ONNX file exported without constant folding keeps
``BatchNormalization``). Left alone, ``DecomposeOpsForInference`` turns each BN into four elementwise ops on the
activation (subtract mean, multiply by rsqrt(var + eps), multiply gamma, add beta) that run on every inference.
This pass rewrites, per output channel ``c`` with ``s[c] = gamma[c] / sqrt(var[c] + eps)``::

    # before
    y = R.nn.conv2d(x, W)                               # optionally + reshape(bias, [1, C, 1, 1])
    z = R.nn.batch_norm(y, gamma, beta, mean, var, axis=1, epsilon=eps)[0]
    # after
    y = R.nn.conv2d(x, W * reshape(s, [C, 1, 1, 1]))
    z = R.add(y, reshape(beta + (bias - mean) * s, [1, C, 1, 1]))

The new weight and shift are expressions of weights only, so ``LiftTransformParams`` (run right after in
``prepare``) moves them into the compile-time weight transform: the artifact stores the folded weights and the
kernel computes ``conv + add`` (which the conv epilogue fusion then fuses with a residual add and ReLU).

Folding happens only when it is exact up to rounding: inference-mode BN (``training=False`` or a BN whose
mean/var are weights), channel axis 1 over an NCHW/OIHW conv (any group count: the scale is per output channel,
and OIHW's O axis is the output channel), weights that are model parameters or constants (never a runtime input),
and a conv output used by nothing else (otherwise the unscaled conv would have to be computed as well).
Conv1d/conv3d (NCW/NCDHW) are folded the same way.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .relax_util import is_call, rewrite_graph_functions, usage_counts

# TVM 0.27 calls Relax constants ``tvm.ir.expr.GenericConst`` (``relax.const`` builds one).
_CONST_TYPE = type(relax.const(0.0))

_CONVS = {"relax.nn.conv1d": ("NCW", "OIW"), "relax.nn.conv2d": ("NCHW", "OIHW"),
          "relax.nn.conv3d": ("NCDHW", "OIDHW")}


@mutator
class _BNFolder(PyExprMutator):
    def __init__(self, mod, weights: set, uses: dict):
        super().__init__(mod)
        self.weights = weights  # Vars that are model parameters (not runtime inputs)
        self.uses = uses
        self.folded = 0

    def _is_weight(self, e) -> bool:
        if isinstance(e, _CONST_TYPE):
            return True
        if isinstance(e, relax.Var):
            if e in self.weights:
                return True
            bound = self.lookup_binding(e)
            # a weight reshaped/cast by the importer (ONNX conv bias: reshape(b, [1, C, 1, 1]))
            if isinstance(bound, relax.Call) and bound.args:
                return all(self._is_weight(a) or isinstance(a, relax.ShapeExpr) for a in bound.args)
        return False

    def _single_use(self, var) -> bool:
        return isinstance(var, relax.Var) and self.uses.get(var, 0) == 1

    def visit_tuple_getitem_(self, op: relax.TupleGetItem):
        op = super().visit_tuple_getitem_(op)
        folded = self._try_fold(op)
        return op if folded is None else folded

    def _try_fold(self, op: relax.TupleGetItem):
        if op.index != 0 or not isinstance(op.tuple_value, relax.Var):
            return None
        bn = self.lookup_binding(op.tuple_value)
        if not is_call(bn, "relax.nn.batch_norm") or self.uses.get(op.tuple_value, 0) != 1:
            return None
        data, gamma, beta, mean, var = bn.args
        attrs = bn.attrs
        if int(attrs.axis) != 1 or not all(self._is_weight(w) for w in (gamma, beta, mean, var)):
            return None
        if not self._single_use(data):
            return None
        conv, bias = self.lookup_binding(data), None
        if is_call(conv, "relax.add"):  # conv + bias (torch Conv2d(bias=True), ONNX Conv with B)
            a, b = conv.args
            inner = self.lookup_binding(a) if isinstance(a, relax.Var) else None
            if not (is_call(inner, "relax.nn.conv2d") or is_call(inner, "relax.nn.conv1d")
                    or is_call(inner, "relax.nn.conv3d")) or not self._is_weight(b) or not self._single_use(a):
                return None
            conv, bias = inner, b
        if not isinstance(conv, relax.Call) or not isinstance(conv.op, tvm.ir.Op) or conv.op.name not in _CONVS:
            return None
        data_layout, kernel_layout = _CONVS[conv.op.name]
        ca = conv.attrs
        if str(ca.data_layout) != data_layout or str(ca.kernel_layout) != kernel_layout:
            return None
        if str(ca.out_layout) not in ("", data_layout):
            return None
        x, w = conv.args
        if not self._is_weight(w):
            return None
        w_info = w.ty
        if not isinstance(w_info, relax.TensorType) or "float" not in str(w_info.dtype) or w_info.shape is None:
            return None
        w_shape = list(w_info.shape.values)
        nd = len(w_shape)
        out_c = w_shape[0]
        dtype = str(w_info.dtype)

        eps = relax.const(float(attrs.epsilon), dtype)
        # Keep BN's own options: without scale, gamma is 1; without center, beta is 0.
        inv_std = relax.op.rsqrt(relax.op.add(var, eps))
        s = relax.op.multiply(gamma, inv_std) if bool(attrs.scale) else inv_std
        shift_src = relax.op.negative(mean) if bias is None else relax.op.subtract(
            relax.op.reshape(bias, [out_c]), mean)
        shift = relax.op.multiply(shift_src, s)
        if bool(attrs.center):
            shift = relax.op.add(shift, beta)
        new_w = relax.op.multiply(w, relax.op.reshape(s, [out_c] + [1] * (nd - 1)))
        new_conv = relax.Call(conv.op, [x, new_w], conv.attrs, conv.ty_args)
        y = self.builder_.emit(new_conv)
        self.folded += 1
        return relax.op.add(y, relax.op.reshape(shift, [1, out_c] + [1] * (nd - 2)))


def _weight_vars(func: relax.Function) -> set:
    n = func.attrs.get("num_input", None) if func.attrs is not None else None
    if n is None:
        return set()  # no split between inputs and weights is known: treat nothing as a weight
    return set(func.params[int(n):])


def fold_batch_norm_function(mod: tvm.IRModule, func: relax.Function) -> tuple[relax.Function, int]:
    folder = _BNFolder(mod, _weight_vars(func), usage_counts(func))
    new = folder.visit_expr(func)
    return new, folder.folded


@tvm.transform.module_pass(opt_level=0, name="ember.FoldBatchNorm")
def FoldBatchNorm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # pylint: disable=invalid-name
    """Module pass: fold every eligible conv + BatchNorm pair of every Relax function (see module doc)."""
    if not count_batch_norms(mod):
        return mod
    # Importers bind BN's unused running-stat outputs (``bn[1]``, ``bn[2]``); drop them so that only real uses
    # of the BN tuple count.
    mod = relax.transform.DeadCodeElimination()(mod)
    def _fold(func):
        new, n = fold_batch_norm_function(mod, func)
        return new if n else None

    mod, changed = rewrite_graph_functions(mod, _fold)
    if not changed:
        return mod
    # Drop the now-dead conv/BN bindings; evaluate the parts that read only constants (torch.export makes the
    # running statistics constants, not parameters): LiftTransformParams lifts what depends on parameters but
    # leaves constant-only expressions in main, where they would otherwise run at every inference.
    mod = relax.transform.DeadCodeElimination()(mod)
    return relax.transform.FoldConstant()(mod)


def count_batch_norms(mod: tvm.IRModule) -> int:
    """How many ``R.nn.batch_norm`` calls remain (for tests and the compile report)."""
    n = [0]

    def _visit(e):
        if is_call(e, "relax.nn.batch_norm"):
            n[0] += 1

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, _visit)
    return n[0]
