"""An attention mask that does not vary along the query rows, rewritten to have one query row.

transformers (4.5x) builds BERT's padding mask as a full ``[B, 1, S, S]`` tensor::

    keep = bitwise_and(arange(S)[None, None, :, None] >= 0 (& True),     # [1, 1, S, 1], all True
                       padding_mask[:, None, None, :])                    # [B, 1, 1, S]
    mask = where(broadcast_to(keep, [B, 1, S, S]), 0.0, float32.min)      # [B, 1, S, S]

so a fused attention kernel would read B x S x S mask values for every head (MiniLM at batch 32: 2 MiB per head
and layer, 12x per layer) where ``B x S`` carry the information. :func:`narrow_rows` finds the same mask with a
query dimension of 1 (``[B, 1, 1, S]`` above), rewriting the elementwise ops on the way to act on the narrow
operands (their broadcasting gives back the full mask):

    keep' = bitwise_and(const True [1, 1, 1, 1], padding_mask[:, None, None, :])
    mask' = where(keep', 0.0, float32.min)                                  # [B, 1, 1, S]

Values that do not depend on the function's inputs (``arange(S) >= 0``) are evaluated with numpy and, when they
are equal along the query axis, replaced by one row of them. Anything else (an op not listed here, a causal mask,
whose rows differ) leaves the mask as it is.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_UNARY = {"relax.astype", "relax.negative", "relax.logical_not", "relax.bitwise_not"}
_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.bitwise_and",
           "relax.logical_and", "relax.bitwise_or", "relax.logical_or", "relax.maximum", "relax.minimum",
           "relax.greater", "relax.greater_equal", "relax.less", "relax.less_equal", "relax.equal",
           "relax.not_equal"}
_NUMPY_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
                 "relax.bitwise_and": np.bitwise_and, "relax.logical_and": np.logical_and,
                 "relax.bitwise_or": np.bitwise_or, "relax.logical_or": np.logical_or,
                 "relax.maximum": np.maximum, "relax.minimum": np.minimum, "relax.greater": np.greater,
                 "relax.greater_equal": np.greater_equal, "relax.less": np.less,
                 "relax.less_equal": np.less_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal}
_MAX_DEPTH = 24
_CONST = type(relax.const(0.0))
_MAX_CONST_ELEMENTS = 1 << 20


def _op(expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def _dims(expr):
    """The shape as a tuple, symbolic dims as None; None when unknown."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return tuple(int(d.value) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values)


def _static_shape(expr):
    dims = _dims(expr)
    return None if dims is None or None in dims else dims


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


class _Narrower:
    def __init__(self, lookup, emit):
        self.lookup, self.emit = lookup, emit

    def value(self, expr, depth=0):
        """numpy value of an input-independent expression, or None."""
        if depth > _MAX_DEPTH:
            return None
        if isinstance(expr, _CONST):
            return expr.value.numpy()
        if isinstance(expr, relax.Var):
            bound = self.lookup(expr)
            return None if bound is None else self.value(bound, depth + 1)
        name = _op(expr)
        if name is None:
            return None
        shape = _static_shape(expr)
        if shape is None or int(np.prod(shape, dtype=np.int64)) > _MAX_CONST_ELEMENTS:
            return None
        dtype = _dtype(expr)
        args = expr.args
        if name == "relax.arange":
            vals = [a.value if isinstance(a, tvm.tirx.IntImm) else self.value(a, depth + 1) for a in args[:3]]
            if any(v is None for v in vals):
                return None
            return np.arange(*(np.asarray(v).item() for v in vals)).astype(dtype)
        if name == "relax.full":
            fill = self.value(args[1], depth + 1)
            return None if fill is None else np.full(shape, np.asarray(fill).item(), dtype)
        if name in ("relax.expand_dims", "relax.reshape", "relax.broadcast_to"):
            x = self.value(args[0], depth + 1)
            if x is None:
                return None
            return np.broadcast_to(x, shape).copy() if name == "relax.broadcast_to" else x.reshape(shape)
        if name == "relax.astype":
            x = self.value(args[0], depth + 1)
            return None if x is None else x.astype(dtype)
        if name in _NUMPY_BINARY:
            a, b = (self.value(x, depth + 1) for x in args[:2])
            if a is None or b is None:
                return None
            return np.asarray(_NUMPY_BINARY[name](a, b)).astype(dtype)
        return None

    def narrow(self, expr, rank: int, depth=0):
        """An expression whose broadcast to ``expr``'s shape is ``expr`` and whose query axis (the second last of
        the ``rank``-D result) is 1 or absent; None when none is found."""
        if depth > _MAX_DEPTH:
            return None
        dims = _dims(expr)
        if dims is None:
            return None
        lead = rank - len(dims)  # broadcasting aligns on the right
        if lead < 0:
            return None
        axis = rank - 2 - lead  # the query axis in expr's own dims (negative: absent)
        if axis < 0 or dims[axis] == 1:
            return expr
        const = self.value(expr)
        if const is not None:
            row = np.take(const, [0], axis=axis)
            if np.array_equal(np.broadcast_to(row, const.shape), const):
                return relax.const(row, _dtype(expr))
            return None
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup(expr)
        name = _op(bound)
        if name == "relax.broadcast_to":
            inner = bound.args[0]
            inner_dims = _dims(inner)
            if inner_dims is None or len(inner_dims) > len(dims):
                return None
            return self.narrow(inner, rank, depth + 1)
        if name in _UNARY:
            x = self.narrow(bound.args[0], rank, depth + 1)
            return None if x is None else self.emit(relax.Call(bound.op, [x], bound.attrs))
        if name in _BINARY or name == "relax.where":
            nargs = len(bound.args) if name == "relax.where" else 2
            parts = [self.narrow(a, rank, depth + 1) for a in bound.args[:nargs]]
            if any(p is None for p in parts):
                return None
            return self.emit(relax.Call(bound.op, parts + list(bound.args[nargs:]), bound.attrs))
        return None


def narrow_rows(mask, lookup, emit):
    """``mask`` ([.., Sq, Sk], rank <= 4, aligned to 4-D) rewritten with one query row (see module doc), or None
    when it varies along the rows or its construction is not understood. ``lookup(var)``: the value bound to a
    var (None if unbound); ``emit(call)``: binds a new call, returns its var."""
    dims = _dims(mask)
    if dims is None or len(dims) < 2 or len(dims) > 4 or dims[-2] == 1:
        return None
    out = _Narrower(lookup, emit).narrow(mask, 4)
    return None if out is None or out is mask else out
