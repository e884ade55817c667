"""Small queries over Relax functions that several passes need."""

from __future__ import annotations

import tvm
from tvm import relax


def is_call(expr, name: str) -> bool:
    """``expr`` is a call of the Relax operator ``name`` (e.g. "relax.nn.conv2d")."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def usage_counts(func: relax.Function) -> dict:
    """How many times each Var is referenced in ``func``'s body: a rewrite may swallow a value used once."""
    counts: dict = {}

    def _visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, _visit)
    return counts
