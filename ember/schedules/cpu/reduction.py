"""CPU rule for row-wise reductions: softmax, layernorm / RMSnorm, mean/sum/max over trailing axes, and the
masks/epilogues FuseOps fuses around them.

What it claims
--------------
A PrimFunc with at least one reduction block (block iter kinds only spatial "S" or reduction "R") that the
matmul rule did not take. That includes reductions of any shape: the rule first checks whether the kernel is
*row-wise* and picks the fused schedule only then; any other reduction gets the safe per-block schedule.

Row-wise means: there is a number ``d`` >= 1 such that every remaining block's first ``d`` iter vars are
spatial, index the first ``d`` dimensions of everything it writes, and every read of an intermediate buffer by
another block uses the reader's own first ``d`` vars as its first ``d`` indices, and the output block's first
``d`` loops have the same extents. Then one "row" (the first ``d`` axes) can be computed start to finish
independently of every other row.

Why the schedule looks the way it does
--------------------------------------
Row-wise kernels: injective single-consumer blocks are inlined first (``exp`` feeding both the sum and the
normalization stays a block, so it is computed once). The output block's first ``d`` loops are fused into one
parallel loop over rows, and every other block is moved under it with ``compute_at``, so a row's max, exp, sum
and normalize run back to back while the row sits in L1, and the intermediates shrink to one row. Spatial
blocks vectorize their innermost axis by the target's lanes.

Reductions over the row's contiguous last axis (at least two vectors long) are vectorized too
(:func:`_vectorize_row_reduction`): the row is reduced into up to 4 independent vector accumulators, which are
then folded into one vector and its lanes summed. Kept serial, a row reduction is one chain of dependent scalar
adds, latency-bound: a 384-wide layer norm took ~0.5 ms for [1024, 384] fp32 on a 2-core AVX-512 Xeon while
the data sat in L2; vectorized ~0.04 ms. The cost: sums now add their terms in another order, so a kernel's
result is no longer bit-identical to the unscheduled one, only equal to fp32 rounding (max is still exact).
Row lengths that are not a multiple of the vector width get one accumulator and a predicated last step that
TVM's LoopPartition peels off (not under a symbolic row loop: those stay serial). A kernel that is one reduction
over a strided axis (a sum over the sequence of [batch, seq, hidden]) is vectorized over its outputs instead, as
below.

Other reductions (a reduction over a middle axis, broadcasting reads between blocks, symbolic rows): each block
stays at the root in its own loop nest; its leading spatial loops are fused and parallelized and its innermost
spatial loop is vectorized. No block is moved, so nothing can be computed for the wrong region. A reduction
block whose innermost output axis is not reduced (NHWC pooling, a global mean) gets its reduction loops moved
outside that axis, which is then vectorized (:func:`_vectorize_over_outputs`), instead of one scalar reduction
per output element.
"""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import const_extent, is_cpu, vars_in, vector_lanes
from .matmul import _LOAD_TYPE, _analyze as _analyze_contraction
from .elementwise import PARALLEL_MIN_ELEMENTS, _region_buffer, schedule_injective_block


def _leading_spatial(block) -> int:
    n = 0
    for iv in block.iter_vars:
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        n += 1
    return n


def _row_depth(sch: s_tir.Schedule, blocks) -> int:
    """The largest ``d`` for which the kernel is row-wise (see module doc), 0 when it is not."""
    stmts = [sch.get(b) for b in blocks]
    d = min(_leading_spatial(s) for s in stmts)
    if d == 0:
        return 0
    produced = {}
    for s in stmts:
        for w in s.writes:
            produced[_region_buffer(w)] = s
    out_loops = sch.get_loops(blocks[-1])

    def ok(depth: int) -> bool:
        if len(out_loops) < depth:
            return False
        row_extents = None
        for s in stmts:
            row_vars = [iv.var for iv in s.iter_vars[:depth]]
            exts = [iv.dom.extent for iv in s.iter_vars[:depth]]
            if row_extents is None:
                row_extents = exts
            elif not all(
                isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm) and a.value == b.value
                or a.same_as(b)
                for a, b in zip(exts, row_extents)
            ):
                return False
            # writes: the first `depth` indices are the row vars
            for w in s.writes:
                if len(w.region) < depth or not all(
                    r.min.same_as(v) and _is_one(r.extent) for r, v in zip(w.region[:depth], row_vars)
                ):
                    return False
            # reads of buffers produced inside the kernel: same row
            for r in s.reads:
                buf = _region_buffer(r)
                if buf not in produced or produced[buf].same_as(s):
                    continue
                if len(r.region) < depth or not all(
                    rg.min.same_as(v) and _is_one(rg.extent) for rg, v in zip(r.region[:depth], row_vars)
                ):
                    return False
        # the output block's loops must be exactly its row loops, trivially bound (normalize_prim_func did that)
        for lp, iv in zip(out_loops[:depth], stmts[-1].iter_vars[:depth]):
            ext = sch.get(lp).extent
            if not (ext.same_as(iv.dom.extent) or (isinstance(ext, tirx.IntImm) and isinstance(
                    iv.dom.extent, tirx.IntImm) and ext.value == iv.dom.extent.value)):
                return False
        return True

    while d > 0 and not ok(d):
        d -= 1
    return d


def _is_one(e) -> bool:
    return isinstance(e, tirx.IntImm) and e.value == 1


class RowReduction(ScheduleRule):
    """Fused per-row schedule for softmax/layernorm-like kernels, safe per-block schedule for other reductions."""

    def apply(self, func, target: Target, tunable: bool):  # pylint: disable=unused-argument
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        try:
            return self._apply(func, target, vector_outputs=True, vector_reductions=True)
        except Exception:  # pylint: disable=broad-except
            pass
        # A primitive refused this kernel (rfactor of a reduction it cannot factor, the output-vectorized
        # reduction of an odd block): the same schedule with serial reductions, then the plain per-block one.
        try:
            return self._apply(func, target, vector_outputs=True, vector_reductions=False)
        except Exception:  # pylint: disable=broad-except
            return self._apply(func, target, vector_outputs=False, vector_reductions=False)

    def _apply(self, func, target: Target, vector_outputs: bool, vector_reductions: bool):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        if any(k not in ("S", "R") for b in infos for k in b.dom_kind()):
            return None
        if all(b.is_injective() for b in infos):
            return None  # elementwise rule's job
        if any(_analyze_contraction(sch.get(b.block_rv)) is not None for b in infos if not b.is_injective()):
            return None  # a matmul/conv: the matmul rule's job (or the fallback's, if it could not tile it)
        blocks = [b.block_rv for b in infos]
        out_stmt = sch.get(blocks[-1])
        dtype = str(_region_buffer(out_stmt.writes[0]).dtype) if out_stmt.writes else "float32"
        lanes = vector_lanes(target, dtype)

        # Inline injective blocks that feed a single consumer (casts/masks into the max, exp-shift chains).
        remaining = []
        for blk in blocks:
            stmt = sch.get(blk)
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars) and len(sch.get_consumers(blk)) == 1:
                try:
                    sch.compute_inline(blk)
                    continue
                except Exception:  # pylint: disable=broad-except
                    pass
            remaining.append(blk)
        # Trailing injective blocks (where/broadcast after the normalization) fold into their producer.
        while len(remaining) >= 2:
            last = remaining[-1]
            stmt = sch.get(last)
            prev = sch.get(remaining[-2])
            if not all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
                break
            if not all(iv.iter_type == tirx.IterVar.DataPar for iv in prev.iter_vars):
                break
            try:
                sch.reverse_compute_inline(last)
            except Exception:  # pylint: disable=broad-except
                break
            remaining.pop()

        d = _row_depth(sch, remaining)
        if d > 0 and len(remaining) == 1 and vector_outputs and _strided_reduction(sch.get(remaining[0])):
            # One reduction over a strided axis (MiniLM's mean pooling: sum over the sequence of [b, s, h]):
            # as rows it would be one strided scalar chain per output; vectorized over the outputs instead.
            if _vectorize_over_outputs(sch, remaining[0], lanes):
                return sch
        if d > 0 and len(remaining) >= 1:
            self._row_wise(sch, remaining, d, lanes, vector_reductions)
        else:
            self._per_block(sch, remaining, lanes, vector_outputs)
        return sch

    @staticmethod
    def _row_wise(sch: s_tir.Schedule, blocks, d: int, lanes: int, vector_reductions: bool = True) -> None:
        out = blocks[-1]
        loops = sch.get_loops(out)
        rows = loops[:d]
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        total = 1
        for lp in sch.get_loops(out):
            ext = const_extent(sch, lp)
            total = total * ext if (ext is not None and total is not None) else None
        # Each block moved under the row loop becomes its first child: the moment rfactor can factor it (see
        # _vectorize_row_reduction), so reductions are vectorized one by one as they arrive.
        inits = []
        for blk in reversed(blocks):
            if blk is not out:
                sch.compute_at(blk, row, preserve_unit_loops=True)
            if vector_reductions:
                row = _vectorize_row_reduction(sch, blk, row, lanes, inits)
        for blk in blocks:
            stmt = sch.get(blk)
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
                _vectorize_inner(sch, blk, lanes)
        # parallel after merge (inside _vectorize_row_reduction), which refuses annotated loops; the inits split
        # off after parallel, which refuses a reduction's update block without its init
        if total is None or total >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(row)
        for blk, loop in inits:
            sch.decompose_reduction(blk, loop)

    @staticmethod
    def _per_block(sch: s_tir.Schedule, blocks, lanes: int, vector_outputs: bool = True) -> None:
        for blk in blocks:
            stmt = sch.get(blk)
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
                schedule_injective_block(sch, blk, lanes)
                continue
            if vector_outputs and _vectorize_over_outputs(sch, blk, lanes):
                continue
            # A reduction block: parallelize its leading loops that are bound to spatial vars only.
            loops = sch.get_loops(blk)
            lead = []
            for lp, iv in zip(loops, stmt.iter_vars):
                if iv.iter_type != tirx.IterVar.DataPar:
                    break
                lead.append(lp)
            # normalize_prim_func bound one loop per iter var in order, so ``lead`` are the spatial loops
            if lead and len(loops) == len(stmt.iter_vars):
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                ext = const_extent(sch, fused)
                if ext is None or ext >= 2:
                    sch.parallel(fused)


# Independent vector accumulators per row reduction, tried in this order: 4 hide the 4-cycle latency of a vector
# add on current x86 cores (and keep both FMA ports busy); fewer where the row is not a whole number of steps of
# them or too short to give each at least two vectors (a 128-key softmax row on AVX-512 gets 4 x 16 lanes, 2 steps
# each). On 768-wide layer-norm rows 4 accumulators ran 1.15x faster than 1; on short rows they tie.
_CHAINS = (4, 2, 1)


def _vectorize_row_reduction(sch: s_tir.Schedule, blk, row, lanes: int, inits: list):
    """Reduce one row of a row-wise kernel in vector registers; returns the row loop (a new one if changed).
    ``blk`` must be the first block under ``row`` (a requirement of rfactor). Appends to ``inits`` the
    (block, loop) pairs whose init the caller splits off with ``decompose_reduction`` once all loops are final.

    Why: a serial reduction is one dependent chain of scalar adds (or max), one add latency per element: a
    384-wide layer-norm row took ~3000 cycles for its mean and variance while its data sat in L1. Here the row
    is reduced as ``chains`` x ``lanes`` partial results, ``part[c, l] op= x[k*chains*lanes + c*lanes + l]`` over
    the steps ``k`` (``chains`` independent vector registers, vectorized over ``l``, unrolled over ``c``); a
    ``fold`` block combines the chains into one vector with vector ops, and the original block, last, combines
    that vector's ``lanes`` values into the row's result (a short scalar loop). The price: sums add their terms in
    another order, so results differ from the unscheduled kernel by rounding (a few ulp of the row's sum); max is
    exact either way.

    Taken when the block's innermost loop is its only reduction, over a constant extent of at least
    2 x ``lanes`` that the block reads contiguously (the reduced var is the last index of a load); otherwise the
    schedule is left as it is. An extent that is not a multiple of ``lanes`` (a "ragged" row, CLIP's 77 keys)
    gets one accumulator and a predicated last step, which TVM's LoopPartition peels off
    (``pragma_loop_partition_hint``) so that the other steps are plain vector code.

    How: the reduction loop is split into (step, chain, lane); ``rfactor`` on the lane loop gives the ``fold``
    block (lanes partial results), ``rfactor`` of that block on the chain loop gives ``part``. rfactor rebuilds
    the loop nest above the factored loop, row loop included, for the new block; ``merge`` joins that copy back
    into the row loop, with the new block first (so it is the first child for the next rfactor). (Factoring
    before ``compute_at`` would not do: ``compute_at`` rebuilds loops from the block's iter domains and drops
    the predicate of a ragged last step, so the kernel would read past the row.)
    """
    stmt = sch.get(blk)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds.count(tirx.IterVar.CommReduce) != 1 or kinds[-1] != tirx.IterVar.CommReduce:
        return row
    if not sch.get(sch.get_child_blocks(row)[0]).same_as(stmt):
        return row  # compute_at placed it after a sibling it does not feed: leave this reduction serial
    if len(stmt.writes) != 1 or stmt.init is None:
        return row
    loops = sch.get_loops(blk)
    ext = const_extent(sch, loops[-1])
    dom = stmt.iter_vars[-1].dom.extent
    if ext is None or not (isinstance(dom, tirx.IntImm) and dom.value == ext):
        return row  # the innermost loop is not (exactly) the reduction's loop
    if ext < 2 * lanes or not _reads_contiguously(stmt.body, stmt.iter_vars[-1].var):
        return row
    exact = [c for c in _CHAINS if ext % (c * lanes) == 0 and ext >= 2 * c * lanes]
    # A ragged row gets one accumulator: its predicated last step is then one vector of scalar work, not
    # ``chains`` of them (1 chain ran 1.5-3x faster than 4 on 77- to 1000-wide softmax rows here).
    chains = exact[0] if exact else 1
    if not exact and const_extent(sch, row) is None:
        # Peeling the ragged step under a symbolic row loop (a dynamic batch) trips TVM 0.27's LoopPartition
        # (int32/int64 index mismatch after NarrowDataType); without peeling every step would be scalarized.
        return row
    n_out = len(stmt.writes[0].region)

    step, chain, lane = sch.split(loops[-1], factors=[None, chains, lanes])
    part = sch.rfactor(lane, factor_axis=n_out)  # part[row..., lane]: sums over (step, chain)
    row = sch.merge(sch.get_loops(part)[0], row)
    fold = None
    if chains > 1:
        fold = part
        part = sch.rfactor(sch.get_loops(fold)[-2], factor_axis=n_out)  # part[row..., chain, lane]: over step
        row = sch.merge(sch.get_loops(part)[0], row)

    step, chain, lane = sch.get_loops(part)[-3:]
    sch.unroll(chain)
    sch.vectorize(lane)
    if ext % (chains * lanes):
        # The last step reads past the row's end and is predicated off lane by lane; LoopPartition (which runs
        # before vectorization) peels it off, so every other step is a plain vector op. The accumulators keep
        # their init inside the loop (``if step == 0``, the same for all lanes): decompose_reduction rejects the
        # predicated block under a parallel loop (its bindings no longer pass TVM's affine check).
        sch.annotate(step, "pragma_loop_partition_hint", 1)
    else:
        # The accumulators start at the reduction's identity, set by an init block before the step loop (its
        # loops inherit these kinds: vector stores).
        inits.append((part, step))
    if fold is not None:
        chain, lane = sch.get_loops(fold)[-2:]
        sch.unroll(chain)
        sch.vectorize(lane)
        inits.append((fold, chain))
    return row


def _strided_reduction(stmt) -> bool:
    """A block whose innermost iter var is a reduction that no load reads contiguously (see below)."""
    ivs = stmt.iter_vars
    return bool(ivs) and ivs[-1].iter_type == tirx.IterVar.CommReduce and not _reads_contiguously(
        stmt.body, ivs[-1].var)


def _reads_contiguously(body, var) -> bool:
    """Some load in ``body`` indexes its last axis with ``var`` (plus terms without it) and no other axis with it:
    consecutive iterations of ``var`` read consecutive addresses, so a vector of them is one vector load."""
    found = [False]

    def _visit(load):
        *lead, last = load.indices
        if var in vars_in(last) and not any(var in vars_in(i) for i in lead):
            found[0] = True

    tvm_ffi.structural_walk(body, (_LOAD_TYPE, _visit), order="post")
    return found[0]


def _vectorize_over_outputs(sch: s_tir.Schedule, blk, lanes: int) -> bool:
    """A reduction whose innermost output axis is not reduced -- NHWC pooling (max over a 3x3 window of
    ``x[n, y, x, c]``), a global average pool, a sum over a middle axis: run the reduction loops *outside* that
    axis and vectorize it, so each step combines ``lanes`` outputs at once (the per-output scalar loop left a
    ResNet-18's 112x112x64 max-pool at 0.79 ms, most of it loop overhead). The parallel loop is the other
    spatial axes, fused. Each output still sees its terms in the original order: results are bit-identical.
    Returns False (schedule untouched) when the block is not of that shape."""
    stmt = sch.get(blk)
    loops = sch.get_loops(blk)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if len(loops) != len(kinds) or tirx.IterVar.CommReduce not in kinds:
        return False
    n_sp = kinds.index(tirx.IterVar.CommReduce)
    if n_sp < 2 or any(k != tirx.IterVar.CommReduce for k in kinds[n_sp:]):
        return False  # need spatial..., reduce... in that order, and a spatial axis left to parallelize
    store = stmt.body
    inner_var = stmt.iter_vars[n_sp - 1].var
    if not isinstance(store, tirx.BufferStore) or not store.indices or not (
            isinstance(store.indices[-1], tirx.Var) and store.indices[-1].same_as(inner_var)):
        return False
    inner = loops[n_sp - 1]
    ext = const_extent(sch, inner)
    if ext is None or ext < 2 or not (ext % lanes == 0 or ext in (2, 4, 8, 16)):
        return False
    lead, reds = loops[: n_sp - 1], loops[n_sp:]
    sch.reorder(*reds, inner)
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    ext_lead = const_extent(sch, fused)
    if ext_lead is None or ext_lead >= 2:
        sch.parallel(fused)
    _vectorize_loop(sch, inner, ext, lanes)
    init = sch.decompose_reduction(blk, reds[0])
    init_inner = sch.get_loops(init)[-1]
    _vectorize_loop(sch, init_inner, const_extent(sch, init_inner), lanes)
    return True


def _vectorize_loop(sch: s_tir.Schedule, loop, ext: int, lanes: int) -> None:
    if ext > lanes and ext % lanes == 0:
        _, v = sch.split(loop, factors=[None, lanes])
        sch.vectorize(v)
    else:
        sch.vectorize(loop)


def _vectorize_inner(sch: s_tir.Schedule, blk, lanes: int) -> None:
    loops = sch.get_loops(blk)
    if len(loops) < 2:
        return
    inner = loops[-1]
    ext = const_extent(sch, inner)
    if ext is None or ext < 2:
        return
    if ext % lanes == 0 and ext > lanes:
        _, v = sch.split(inner, factors=[None, lanes])
        sch.vectorize(v)
    elif ext == lanes:
        sch.vectorize(inner)
