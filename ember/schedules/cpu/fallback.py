"""CPU catch-all rule: make any kernel the other rules declined use the cores, without changing what it computes.

What it claims
--------------
Every PrimFunc on an ``llvm`` target (it is the last rule in the list). Kernels reach it when the specialised
rules refuse them: opaque blocks, scans, gathers with data-dependent loops, contractions whose IR shape could
not be tiled.

Why the schedule looks the way it does
--------------------------------------
It only inlines spatial blocks (exact substitution) and then, per remaining root block, fuses and parallelizes
the leading loops that are bound to spatial iter vars -- distinct iterations of those write distinct outputs, so
running them on different cores is safe. It never reorders or splits a reduction, so results are bit-identical to
the unscheduled kernel. If even that is refused it returns the kernel untouched (still marked scheduled, so
the pipeline does not retry).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import const_extent, is_cpu


class Fallback(ScheduleRule):
    """Parallelize the leading spatial loops of each root block (see module docstring)."""

    def apply(self, func, target: Target, tunable: bool):  # pylint: disable=unused-argument
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            root = sch.get_sblock("root")
            blocks = sch.get_child_blocks(root)
        except Exception:  # pylint: disable=broad-except
            return sch
        for blk in blocks:
            try:
                self._parallel_leading(sch, blk)
            except Exception:  # pylint: disable=broad-except
                continue
        return sch

    @staticmethod
    def _parallel_leading(sch: s_tir.Schedule, blk) -> None:
        stmt = sch.get(blk)
        loops = sch.get_loops(blk)
        lead = []
        for lp, iv in zip(loops, stmt.iter_vars):
            if iv.iter_type != tirx.IterVar.DataPar:
                break
            lead.append(lp)
        if not lead or len(loops) != len(stmt.iter_vars):
            return
        fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        ext = const_extent(sch, fused)
        if ext is None or ext >= 2:
            # TVM re-checks that the fused loop only drives spatial iter vars and raises otherwise.
            sch.parallel(fused)
