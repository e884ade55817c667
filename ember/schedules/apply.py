"""Compile with a tuning database: tuned kernels take their best measured schedule, the rest keep ember's rules.

``apply_database_pass(db, target)`` runs MetaSchedule's ``MetaScheduleApplyDatabase`` with ``db`` as the current
database, right after fusion and before ember's rule pass. ``MetaScheduleApplyDatabase`` replays the best record
of every PrimFunc the database has (matched by structural equality) and marks it ``tirx.is_scheduled``; the rule
pass then skips those. Replaying a trace with tensorize steps (VNNI, tensor cores) needs the intrinsics
registered, so this registers the target's intrinsics first when the database has such a trace (see
ember.schedules.builder).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from .builder import register_intrinsics
from .tuning_db import TuningDatabase, open_database


def _scheduled_names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)}


def _prim_names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def apply_database_pass(db, target: tvm.target.Target, stats: dict | None = None) -> tvm.transform.Pass:
    """Module pass: schedule every kernel ``db`` has a record for. ``stats`` (a dict) receives the counts."""
    stats = stats if stats is not None else {}

    @tvm.transform.module_pass(opt_level=0, name="ember.apply_tuning_database")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # Only a trace that tensorizes looks intrinsics up by name; registering CUDA's costs ~35 s (builder.py).
        if getattr(db, "uses_tensor_intrinsics", lambda: True)():
            register_intrinsics(target)
        before = _scheduled_names(mod)
        with target, db:
            out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        tuned = sorted(_scheduled_names(out) - before)
        stats.update({"kernels": len(_prim_names(out)), "tuned_kernels": len(tuned), "tuned": tuned})
        return out

    return _apply


def open_for_compile(tuning, target: tvm.target.Target) -> TuningDatabase:
    """The read-only database ``ember.compile(..., tuning=Tuning(database=...))`` applies."""
    return open_database(tuning.database, target, writable=False)


__all__ = ["apply_database_pass", "open_for_compile"]
