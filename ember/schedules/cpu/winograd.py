"""CPU rule for the Winograd transform kernels of ember.passes.winograd.

What it claims
--------------
A PrimFunc whose blocks are all spatial and one of which is named ``ember_winograd_input_m<m>`` or
``ember_winograd_output_m<m>`` (FuseTIR may append a suffix). The batched GEMM between them is an ordinary
packed batched matmul that ember.schedules.cpu.matmul tiles; it is not claimed here.

Why the schedule looks the way it does
--------------------------------------
Each output element of a transform is a Select over the tile position -- ``(a, b)`` for the input transform,
``(h % m, w % m)`` for the output transform -- of a short sum of the tile's values with constant
coefficients. The rule makes those positions innermost-but-one loops of constant extent and unrolls them, so
every Select condition is a constant and folds away, leaving straight-line adds over the tile that LLVM
computes once per load (the loads of one tile are shared by all its positions). The channel axis (contiguous
in NHWC and in the GEMM layouts) is innermost and vectorized; the tiles are fused into one parallel loop.

* input ``v[a, b, p, c]``:  ``p`` (parallel) / ``c`` outer / ``a``, ``b`` unrolled / ``c`` vector lanes;
* output ``y[n, h, w, o]``: ``(n, h / m, w / m)`` (parallel) / ``o`` outer / ``h % m``, ``w % m`` unrolled /
  ``o`` vector lanes. The epilogue FuseOps attached (BatchNorm shift, residual add, ReLU) is inlined into the
  transform first (``reverse_compute_inline``), so each output is written once, already activated. An output
  size that is not a multiple of m gets a predicated last tile (``split`` adds the bounds check).
"""

from __future__ import annotations

import re

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import const_extent, is_cpu, vector_lanes
from .elementwise import schedule_injective_block

_NAME = re.compile(r"^ember_winograd_(input|output)_m(\d+)")
_STAGE = re.compile(r"^ember_winograd_(input_rows|output_cols)_m(\d+)")


def _winograd_block(sch: s_tir.Schedule, infos):
    for i, info in enumerate(infos):
        match = _NAME.match(sch.get(info.block_rv).name_hint)
        if match:
            return i, match.group(1), int(match.group(2))
    return None


def _split_vector(sch: s_tir.Schedule, loop, lanes: int):
    """(outer, inner vector loop or None) for the channel axis."""
    ext = const_extent(sch, loop)
    if ext is not None and ext % lanes == 0 and ext > lanes:
        return sch.split(loop, factors=[None, lanes])
    if ext is not None and ext <= lanes:
        return None, loop
    return loop, None  # not a multiple of the vector width: scalar (correct, rare for real channel counts)


def _store_axes(sch: s_tir.Schedule, block):
    """For each index of the block's output, the loop that iterates it, or None (a unit dimension that
    normalize_prim_func dropped: the index is a constant). None when the block is not in that form."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars):
        return None
    loop_of = {iv.var: lp for iv, lp in zip(stmt.iter_vars, loops)}
    axes = []
    for idx in stmt.body.indices:
        if isinstance(idx, tirx.IntImm):
            axes.append(None)
            continue
        match = [lp for v, lp in loop_of.items() if isinstance(idx, tirx.Var) and v.same_as(idx)]
        if len(match) != 1:
            return None
        axes.append(match[0])
    return axes if len(axes) == 4 else None


class WinogradTransform(ScheduleRule):
    """Unrolled tile positions, vectorized channels, parallel tiles (see module docstring)."""

    def apply(self, func, target: Target, tunable: bool):  # pylint: disable=unused-argument
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        found = _winograd_block(sch, infos)
        if found is None:
            return None
        pos, kind, m = found
        main = infos[pos].block_rv
        stage = [b.block_rv for b in infos[:pos] if _STAGE.match(sch.get(b.block_rv).name_hint)]
        if len(stage) != 1:
            return None
        stage = stage[0]
        lanes = vector_lanes(target, "float32")
        leftover = []
        # prologue (e.g. a ReLU FuseOps put before the input transform): inlined into the reads
        for info in infos[:pos]:
            if info.block_rv.same_as(stage):
                continue
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # pylint: disable=broad-except
                leftover.append(info.block_rv)
        # epilogue (BatchNorm shift, residual add, ReLU): intermediate blocks inlined into their consumers (an
        # expression read twice is then computed twice, cheaper than a round trip through memory), the last one
        # into the output transform's write
        epilogue = [info.block_rv for info in infos[pos + 1:]]
        for blk in epilogue[:-1]:
            try:
                sch.compute_inline(blk)
            except Exception:  # pylint: disable=broad-except
                leftover.append(blk)
        if epilogue and not leftover:
            try:
                sch.reverse_compute_inline(epilogue[-1])
            except Exception:  # pylint: disable=broad-except
                leftover.append(epilogue[-1])
        elif epilogue:
            leftover.append(epilogue[-1])  # runs after the transform as its own parallel loop
        axes = _store_axes(sch, main)  # the loop of each output dimension, None where it has extent 1
        if axes is None:
            return None
        if kind == "input":
            a, b, p, c = axes
            if a is None or b is None or c is None:
                return None
            c_o, c_v = _split_vector(sch, c, lanes)
            tile = [lp for lp in (p, c_o) if lp is not None]
            if not tile:
                return None
            sch.reorder(*tile, a, b, *([c_v] if c_v is not None else []))
            sch.parallel(tile[0])
            inner = [a, b]
        else:
            n, h, w, o = axes
            if o is None:
                return None
            split_h = sch.split(h, factors=[None, m]) if h is not None else (None, None)
            split_w = sch.split(w, factors=[None, m]) if w is not None else (None, None)
            c_o, c_v = _split_vector(sch, o, lanes)
            outer = [lp for lp in (n, split_h[0], split_w[0]) if lp is not None]
            inner = [lp for lp in (split_h[1], split_w[1]) if lp is not None]
            sch.reorder(*outer, *([c_o] if c_o is not None else []), *inner, *([c_v] if c_v is not None else []))
            tile = []
            if outer:
                fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
                sch.parallel(fused)
                tile.append(fused)
            if c_o is not None:
                tile.append(c_o)
            if not tile:
                return None
        # the first stage per tile and channel vector, into a small local buffer (alpha x alpha x lanes)
        sch.compute_at(stage, tile[-1], preserve_unit_loops=False)
        stage_loops = sch.get_loops(stage)[len(tile):]
        for lp in inner:
            sch.unroll(lp)
        if c_v is not None:
            sch.vectorize(c_v)
        for lp in stage_loops:
            ext = const_extent(sch, lp)
            if c_v is not None and lp.same_as(stage_loops[-1]) and ext is not None and ext > 1:
                sch.vectorize(lp)
            elif ext is not None and ext > 1:
                sch.unroll(lp)
        for blk in leftover:
            schedule_injective_block(sch, blk, lanes)
        return sch


__all__ = ["WinogradTransform"]
