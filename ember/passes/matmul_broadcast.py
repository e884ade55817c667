"""Drop explicit batch broadcasts in front of ``R.matmul``: matmul broadcasts its batch dims by itself.

torch's decomposition of ``aten.linear``/``aten.matmul`` on a 3-D input that is not contiguous (transformers'
SDPA attention output, after its transpose + reshape) is ``expand`` + ``bmm``, which the importer turns into::

    wt = R.permute_dims(W, [1, 0])                      # [K, N]
    xb = R.broadcast_to(x, [B, S, K])                   # a no-op: x already has that shape
    wb = R.broadcast_to(wt, [B, K, N])                  # the weight copied B times
    y  = R.matmul(xb, wb)

``wb`` depends on weights alone, so ``LiftTransformParams`` precomputes it: the artifact stores every such
weight B times (MiniLM at batch 32, fp16: 80 MiB of params instead of 22 MiB) and each GEMM reads B copies.
This pass feeds the un-broadcast operand to the matmul whenever the matmul's result shape stays the same, which
is exactly when matmul's own broadcasting reproduces what ``broadcast_to`` did (the last two dims, the matrix
dims, are never touched by a batch broadcast that keeps the result shape).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm_ffi import structural_equal

from .relax_util import is_call, rewrite_graph_functions


def _matrix_dims_kept(src_ty, dst_ty) -> bool:
    """``broadcast_to`` from ``src_ty`` to ``dst_ty`` leaves the last two (matrix) dims as they were."""
    if not (isinstance(src_ty, relax.TensorType) and isinstance(dst_ty, relax.TensorType)):
        return False
    if src_ty.shape is None or dst_ty.shape is None:
        return False
    src, dst = list(src_ty.shape.values), list(dst_ty.shape.values)
    if len(src) < 2 or len(dst) < len(src):
        return False
    return all(structural_equal(a, b) for a, b in zip(src[-2:], dst[-2:]))


@mutator
class _BroadcastDropper(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.dropped = 0

    def _source(self, operand):
        """The tensor ``operand`` was broadcast from, if it was broadcast only along batch dims."""
        if not isinstance(operand, relax.Var):
            return None
        bound = self.lookup_binding(operand)
        if not is_call(bound, "relax.broadcast_to"):
            return None
        src = bound.args[0]
        return src if _matrix_dims_kept(src.ty, operand.ty) else None

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not is_call(call, "relax.matmul"):
            return call
        args = list(call.args)
        old_shape = call.ty.shape if isinstance(call.ty, relax.TensorType) else None
        if old_shape is None:
            return call
        changed = 0
        for i in range(2):
            src = self._source(args[i])
            if src is None:
                continue
            trial = list(args)
            trial[i] = src
            new = self.builder_.normalize(relax.Call(call.op, trial, call.attrs, call.ty_args))
            # Dropping both broadcasts could shrink the batch (both sides broadcast from batch 1): keep a
            # broadcast wherever removing it changes the result.
            if isinstance(new.ty, relax.TensorType) and new.ty.shape is not None and \
                    structural_equal(new.ty.shape, old_shape):
                args, changed = trial, changed + 1
        if not changed:
            return call
        self.dropped += changed
        return relax.Call(call.op, args, call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="ember.DropMatmulBroadcast")
def DropMatmulBroadcast(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # pylint: disable=invalid-name
    """Module pass: see the module doc. The dead ``broadcast_to`` bindings are removed."""
    def _drop(func):
        dropper = _BroadcastDropper(mod)
        new = dropper.visit_expr(func)
        return new if dropper.dropped else None

    mod, changed = rewrite_graph_functions(mod, _drop)
    if not changed:
        return mod
    return relax.transform.DeadCodeElimination()(mod)
