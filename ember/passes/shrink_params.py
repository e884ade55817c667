"""Store a weight that repeats along an axis once: a ``[B, S, H]`` tensor equal along B shrinks to ``[1, S, H]``.

Why: ember precomputes every weight-only computation at compile time (``LiftTransformParams``, then
``build._transform_params``), and some of those broadcast a small constant to the shape of the input.
transformers' BERT looks up its token-type embedding with a buffer of zero ids expanded to ``[batch, seq]``, so the
precomputed result is a ``[B, S, 384]`` tensor whose B x S rows are one and the same vector: at batch 32 that is
6 MiB stored in the artifact and read on every inference for 1.5 KiB of information.

Binary elementwise ops broadcast by themselves. When every use of such a weight is one whose other operand already
has the op's full output shape, feeding the weight at its smallest shape changes no result and no other shape,
so the rewrite is exact. Anything else (a weight used by a matmul, a convolution, a concat, returned as is) is left
alone: those ops would need an explicit broadcast that could stand in the way of their kernels.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm_ffi import structural_equal

from .relax_util import usage_counts

# Ops whose operands broadcast numpy-style and whose output shape is the broadcast of the operands' shapes.
_BROADCASTING = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
                 "relax.power"}
MIN_ELEMENTS = 4096  # smaller weights are not worth a look


def repeated_axes(a: np.ndarray) -> tuple[int, ...]:
    """Axes (of extent > 1) along which every slice of ``a`` equals the first one."""
    axes = []
    for ax, n in enumerate(a.shape):
        if n < 2:
            continue
        first = np.take(a, [0], axis=ax)
        # Comparing the second slice first rejects ordinary weights without a full pass over them.
        if np.array_equal(np.take(a, [1], axis=ax), first) and np.array_equal(a, np.broadcast_to(first, a.shape)):
            axes.append(ax)
    return tuple(axes)


def _static_shape(ty) -> tuple | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        return None


def _broadcast_only_uses(func: relax.Function, candidates: set) -> set:
    """The candidates whose every use is a broadcasting binary op whose other operand has the output's shape."""
    counts = usage_counts(func)
    fine: dict = {}
    blocks = func.body.blocks if isinstance(func.body, relax.SeqExpr) else []
    for block in blocks:
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(binding, relax.VarBinding) and isinstance(call, relax.Call)
                    and getattr(call.op, "name", None) in _BROADCASTING and len(call.args) == 2):
                continue
            out = _static_shape(binding.var.ty)
            for i, arg in enumerate(call.args):
                other = call.args[1 - i]
                if arg in candidates and other not in candidates and out is not None \
                        and _static_shape(other.ty) == out:
                    fine[arg] = fine.get(arg, 0) + 1
    return {v for v in candidates if fine.get(v, 0) == counts.get(v, 0) > 0}


@mutator
class _Substitute(PyExprMutator):
    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var):
        return self.mapping.get(var, var)


def shrink_repeated_params(mod, params: list, num_inputs: int | None = None):
    """Shrink ``main``'s weights that repeat along an axis (see the module doc).

    ``params``: the weights ``main`` takes after its ``num_inputs`` inputs (tvm tensors or numpy arrays), in order.
    Returns ``(mod, params, report)``; ``report`` lists each shrunk weight as ``(name, old shape, new shape)``.
    """
    func = mod["main"]
    weights = list(func.params)[len(func.params) - len(params):] if num_inputs is None else \
        list(func.params)[num_inputs:]
    arrays, shrunk = {}, {}
    for var, p in zip(weights, params):
        shape = _static_shape(var.ty)
        if shape is None or int(np.prod(shape)) < MIN_ELEMENTS:
            continue
        a = p.numpy() if hasattr(p, "numpy") else np.asarray(p)
        axes = repeated_axes(a)
        if axes:
            arrays[var] = a
            shrunk[var] = axes
    usable = _broadcast_only_uses(func, set(shrunk)) if shrunk else set()
    if not usable:
        return mod, params, []
    mapping, new_params, report = {}, list(params), []
    for idx, var in enumerate(weights):
        if var not in usable:
            continue
        a = arrays[var]
        small = np.ascontiguousarray(a[tuple(slice(0, 1) if ax in shrunk[var] else slice(None)
                                             for ax in range(a.ndim))])
        mapping[var] = relax.Var(var.name, relax.TensorType(list(small.shape), var.ty.dtype))
        new_params[idx] = small if isinstance(params[idx], np.ndarray) else _like(params[idx], small)
        report.append((var.name, tuple(a.shape), tuple(small.shape)))
    new_func = relax.Function([mapping.get(v, v) for v in func.params], func.body, func.ret_ty, func.is_pure,
                              func.attrs)
    new_func = _Substitute(mapping).visit_expr(new_func)
    if not structural_equal(new_func.ret_ty, func.ret_ty):  # cannot happen by construction; never hand out a
        return mod, params, []                            # module whose outputs changed shape
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), new_func)
    return mod, new_params, report


def _like(template, array: np.ndarray):
    import tvm

    return tvm.runtime.tensor(array, template.device)
