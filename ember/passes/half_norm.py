"""Normalization outputs stored in fp16 where the graph already rounds them to fp16 (``precision="fp16"``, GPUs).

Why: ``ToMixedPrecision`` keeps layer norms in fp32, so in a post-norm transformer the residual stream is fp32
and every layer norm is surrounded by casts: its output is cast to fp16 for the next matmuls, and the fp16
outputs of the attention / FFN projections are cast back up for the residual add. On the H100 those casts were
24 separate kernels per MiniLM (113 us of 1077 at batch 32, BENCHMARKS.md), and the add + layer norm kernel read
and wrote fp32 (twice the bytes). This pass makes the layer norm's *stored* output fp16 — computed in fp32 as
before, rounded once when written — and feeds the fp32 users the widened fp16 value::

    before                                         after
      y   = layer_norm(x, g, b)        # f32         y   = layer_norm(x, g, b)      # f32, only used below
      y2  = reshape(y, (4096, 384))                  y16 = astype(y, "float16")     # written by the LN kernel
      q   = astype(y2, "float16")      # -> matmuls  q   = reshape(y16, (4096, 384))
      r   = add(astype(h, "float32"), y)             r   = add(astype(h, "float32"), astype(y16, "float32"))

With :func:`ember.passes.fusion.epilogue_patterns` (``casts=True``) the add + layer norm then becomes one kernel
that reads two fp16 tensors, computes in fp32 and writes fp16: no cast kernels remain around it.

What it changes numerically (``widen=True``): the fp32 users (the next residual add) now see the layer norm's
output rounded to fp16 — the value the matmuls already read — instead of the exact fp32 one (torch's fp16 models
round it too). MiniLM fp16 on the H100: max error vs torch fp32 8.8e-3 instead of 1.9e-3 (torch fp16: 1.3e-2).
``widen=False`` (ember's GPU default, ``ember.passes.fusion.EXACT_RESIDUAL``) keeps the exact fp32 value for
those users: nothing changes numerically, and the add + layer norm kernel writes two outputs (fp32 for the
residual, fp16 for the matmuls) instead of one — more bytes, but still no separate cast kernels.
Layer norms whose output is a function output, or that have no fp16-cast user (nothing rounds them yet), are
left alone, so the model's outputs keep full precision. rms_norm is treated like layer_norm.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_NORMS = ("relax.nn.layer_norm", "relax.nn.rms_norm")
_VIEW = "relax.reshape"


def _op(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _plan(func: relax.Function):
    """norm var -> (cast-end vars, ok): which layer norms to rewrite and the ``astype(view*(y), f16)`` bindings
    that then read the fp16 value instead."""
    bound, users = {}, {}
    for block in getattr(func.body, "blocks", []):
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bound[b.var] = b.value

            def _use(e, var=b.var):
                if isinstance(e, relax.Var):
                    users.setdefault(e, []).append(var)

            relax.analysis.post_order_visit(b.value, _use)
    plan = {}
    for var, val in bound.items():
        if _op(val) not in _NORMS or _dtype(var) != "float32" or not isinstance(var, relax.DataflowVar):
            continue
        casts, frontier, ok = [], [var], True
        while frontier:  # walk the views of y; a non-dataflow view is a function output: leave y alone
            v = frontier.pop()
            for u in users.get(v, []):
                uval = bound[u]
                if _op(uval) == _VIEW and uval.args[0].same_as(v):
                    if not isinstance(u, relax.DataflowVar):
                        ok = False
                    frontier.append(u)
                elif _op(uval) == "relax.astype" and str(uval.attrs.dtype) == "float16":
                    casts.append(u)
        if ok and casts:
            plan[var] = casts
    return plan


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, plan, widen: bool = True):
        super().__init__(mod)
        self.plan, self.widen = plan, widen
        self.cast_ends = {c: y for y, cs in plan.items() for c in cs}
        self.half = {}  # norm var -> its fp16 value
        self.rewritten = 0

    def visit_var_binding_(self, binding: relax.VarBinding):
        var = binding.var
        if var in self.cast_ends and self.cast_ends[var] in self.half:
            y16 = self.half[self.cast_ends[var]]
            shape = var.ty.shape
            value = y16 if _same_shape(y16, var) else relax.op.reshape(y16, shape)
            new = self.builder_.emit(value, name_hint=var.name)
            self.set_var_remap(var, new)
            return
        if var not in self.plan:
            super().visit_var_binding_(binding)
            return
        y = self.builder_.emit(self.visit_expr(binding.value), name_hint=var.name)
        y16 = self.builder_.emit(relax.op.astype(y, "float16"), name_hint=var.name + "_f16")
        self.half[var] = y16
        if self.widen:
            y32 = self.builder_.emit(relax.op.astype(y16, "float32"), name_hint=var.name + "_wide")
            self.set_var_remap(var, y32)  # every other user reads the widened fp16 value
        else:
            self.set_var_remap(var, y)  # the other users keep the exact fp32 value
        self.rewritten += 1


def _same_shape(a, b) -> bool:
    sa, sb = a.ty.shape, b.ty.shape
    return sa is not None and sb is not None and tvm_ffi.structural_equal(sa, sb)


def HalfNormOutputs(widen: bool = True) -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """Module pass: store fp32 layer/RMS norm outputs that feed fp16 casts as fp16 (see module doc).
    ``widen=False``: the fp32 users keep the exact fp32 output (the norm kernel then writes both)."""

    @tvm.transform.module_pass(opt_level=0, name="ember.HalfNormOutputs")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        changed = False
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
                continue
            plan = _plan(func)
            if not plan:
                continue
            rw = _Rewriter(mod, plan, widen)
            new = rw.visit_expr(func)
            mod = rw.builder_.get()
            mod.update_func(gv, new)
            changed = True
        return relax.transform.DeadCodeElimination()(mod) if changed else mod

    return _pass
