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


def rewrite_graph_functions(mod: tvm.IRModule, rewrite) -> tuple[tvm.IRModule, bool]:
    """Apply ``rewrite(func) -> new func or None`` to every Relax function of ``mod`` that is not a fused
    primitive; returns (a copy of ``mod`` with the rewritten functions, whether any changed). The caller's module
    is left as it was, and an unchanged module is returned as is (no clone)."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and not (func.attrs and "Primitive" in func.attrs):
            new = rewrite(func)
            if new is not None:
                updates[gv] = new
    if not updates:
        return mod, False
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod, True
