"""CPU rule for elementwise / injective kernels (casts, adds, GELU, reshapes, transposes, gathers, masks).

What it claims
--------------
A PrimFunc in which every block is spatial (no reduction axis): FuseOps' injective groups such as
``fused_reshape1_reshape3_transpose_multiply_broadcast_to3_reshape4`` or a standalone ``take``.

Why the schedule looks the way it does
--------------------------------------
Each chain of injective blocks is first inlined into its final consumer, so the kernel reads its inputs once and
writes its outputs once, with no full-size temporaries in between (inlining only substitutes expressions, so the
values are unchanged). What remains is one loop nest per output. Its innermost loop is the output's contiguous
axis: it is split by the target's vector lanes and vectorized when the extent is a multiple of the lanes (a
non-multiple or symbolic extent stays scalar rather than carrying a per-element predicate). All outer loops are
fused into one loop that is spread over the cores, but only when the kernel is big enough to pay for waking the
thread pool (a few microseconds), so tiny mask/shape kernels stay single-threaded.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import const_extent, is_cpu, vector_lanes

# Below this many output elements (256 KiB of fp32) waking the thread pool costs more than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 16


def _spatial_loops_ok(sch: s_tir.Schedule, loops) -> bool:
    return all(sch.get(lp).kind == tirx.ForKind.SERIAL for lp in loops)


def schedule_injective_block(sch: s_tir.Schedule, blk, lanes: int, min_parallel: int = PARALLEL_MIN_ELEMENTS) -> None:
    """Vectorize the innermost loop and parallelize the fused outer loops of one root-level spatial block.

    Only loops that are bound to spatial block vars are touched (the caller guarantees the block is spatial), so
    every iteration writes a distinct output element and any order or parallel split gives the same result.
    """
    loops = sch.get_loops(blk)
    if not loops or not _spatial_loops_ok(sch, loops):
        return
    total = 1
    for lp in loops:
        ext = const_extent(sch, lp)
        total = total * ext if ext is not None and total is not None else None
    inner = loops[-1]
    inner_ext = const_extent(sch, inner)
    outer = list(loops[:-1])
    if inner_ext is not None and inner_ext % lanes == 0 and inner_ext > lanes:
        o, v = sch.split(inner, factors=[None, lanes])
        sch.vectorize(v)
        outer.append(o)
    elif inner_ext is not None and inner_ext == lanes:
        sch.vectorize(inner)
    elif inner_ext is not None and inner_ext > lanes and len(outer) == 0:
        # A single non-multiple axis: keep the tail scalar but still give the threads something to split.
        o, _ = sch.split(inner, factors=[None, lanes])
        outer.append(o)
    if outer and (total is None or total >= min_parallel):
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


def inline_all_injective(sch: s_tir.Schedule, blocks) -> list:
    """Inline spatial blocks into their consumers (then producers) until no more can be inlined.

    ``compute_inline``/``reverse_compute_inline`` refuse blocks that are outputs or whose substitution is not
    exact, so what they accept computes exactly the same values. Returns the blocks that remain.
    """
    remaining = list(blocks)
    changed = True
    while changed:
        changed = False
        for prim in ("compute_inline", "reverse_compute_inline"):
            for blk in list(remaining):
                try:
                    getattr(sch, prim)(blk)
                except Exception:  # pylint: disable=broad-except
                    continue
                remaining.remove(blk)
                changed = True
    return remaining


class Elementwise(ScheduleRule):
    """Inline injective chains, then vectorize the inner axis and parallelize the outer ones (see module doc)."""

    def apply(self, func, target: Target, tunable: bool):  # pylint: disable=unused-argument
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        dtype = _out_dtype(sch, infos[-1].block_rv)
        lanes = vector_lanes(target, dtype)
        remaining = inline_all_injective(sch, [b.block_rv for b in infos])
        for blk in remaining:
            schedule_injective_block(sch, blk, lanes)
        return sch


def _out_dtype(sch: s_tir.Schedule, blk) -> str:
    writes = sch.get(blk).writes
    return str(_region_buffer(writes[0]).dtype) if writes else "float32"


def _region_buffer(region):
    # TVM 0.27 calls the buffer of a BufferRegion ``source``; older releases called it ``buffer``.
    src = getattr(region, "source", None)
    return src if src is not None else region.buffer
