"""CPU rule for contractions: dense/matmul (2-D and batched), attention batch-matmul, and direct conv2d.

What it claims
--------------
A PrimFunc whose only non-injective block is a sum of products

    C[s0, ..., sn] += X[...] * Y[...]          (X, Y buffer loads, possibly wrapped in casts)

where the store indices are plain spatial block variables and the innermost one (``sn``, the contiguous
output axis) is read by exactly one operand. That operand is called B, the other A. Spatial variables that
only A reads are "M" axes; ``sn`` is the "N" axis; everything else spatial is an outer (batch-like) axis.
This covers ``A[m, k] * B[k, n]`` (dense after ember's compile-time weight transpose), batched matmul
``[b, m, k] x [b, k, n]`` (attention's QK^T and PV), and NCHW conv2d ``In[n, c, y + ry, x + rx] * W[f, c, ry, rx]``
(N = output width x, M = output channels f). Injective prologue blocks (reshape/transpose) are inlined into the
operand reads, except ones that select between values (conv padding), which stay as separate parallel
blocks; injective epilogue blocks (bias add, GELU, residual add, BatchNorm scale/shift, ReLU) are fused into the
tile write-back (an epilogue that reads the product through a reshape is first re-indexed by the product's own
rows, see :func:`_align_consumer`; one that cannot be runs as its own parallel loop after the product). It returns None on anything else (e.g. a reduction whose innermost output axis is the
reduction-side operand's contiguous axis, like ``W[m, k] * x[k]``; the reduction rule handles those).

Why the schedule looks the way it does
--------------------------------------
The inner kernel is the classic outer-product register tile: for each k, broadcast ``MR`` scalars of A, load
``NR / lanes`` vectors of B, and do ``MR * NR / lanes`` fused multiply-adds into accumulators that stay in
vector registers for the whole K loop. ``NR`` is one to four vectors wide (read from the target's ISA: 8 fp32
lanes on AVX2, 16 on AVX-512) and ``MR`` is sized so the accumulators use ~3/4 of the register file (12 of
AVX2's 16 registers, 24 of AVX-512's 32), leaving room for the B vectors and the broadcast; the shape prefers
an ``MR`` dividing M and an ``NR`` dividing N so no tile needs a bounds check. When B is a weight that
ember.passes.layout packed into ``[N/NR, K, NR]`` panels (read as ``B[n // NR, k, n % NR]``), NR is exactly the
panel width (:func:`panel_width` is how the layout pass asked for it), so each tile's K x NR panel is one
contiguous stream instead of K rows far apart (a TLB miss every few rows for a deep conv layer). The accumulator is a ``local`` buffer of ``MR x NR`` indexed only by the unrolled row
and the vector lane, so LLVM promotes it to registers. The reduction axes sit between the tile loops and the
register loops; for large K x N panels the N axis is first blocked so one panel of B (``K x NB``) stays in
L2 while every row tile of A streams past it; axes only A reads (a conv's output rows, a batch flattened
into A) iterate inside those N blocks too, so a conv's weights are streamed once, not once per output row.
A conv on a small image with a deep reduction (ResNet's 7x7x512 layers) is K-blocked instead (:func:`_k_block`):
one weight panel per task, the reduction in L1-sized chunks, each chunk swept by every output row.
The outer tiles are fused with the batch axes into a single parallel loop over the target's cores. The epilogue is computed per register tile right after the
K loop, while the tile is still hot, so the fused ``matmul + bias + gelu`` writes each output once.

Sizes that are not multiples of the tile are split with a predicate (TVM's ``split`` adds the bounds check),
so odd and prime sizes and symbolic (dynamic batch) extents stay correct; the predicated tiles run scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import (
    const_extent,
    has_if_then_else,
    is_cpu,
    num_cores,
    num_vector_registers,
    vars_in,
    vector_lanes,
)

# Budget for one B panel (K x NB floats) that should stay in the per-core L2 while the row tiles of A stream
# past it. 256 KiB is half of a Zen 3 / Skylake-SP L2 (the other half holds A rows and C tiles).
_L2_PANEL_BYTES = 256 * 1024
# K-blocking (see _k_block): a chunk of one B panel of at most this many bytes is swept by every row of the task
# while it sits in L1 (48 KiB on Ice Lake / Sapphire Rapids, 32 KiB on Zen 3: the A rows and C tile share it);
# the per-panel accumulator it needs (all rows x NR) may take this many bytes.
_L1_CHUNK_BYTES = 16 * 1024
_KBLOCK_ACC_BYTES = 64 * 1024


@dataclass
class _Contraction:
    outer: list  # spatial iter vars that are neither M nor N, in block order
    outer_a: list  # those of ``outer`` that only A reads (a conv's output rows, a batch flattened into A)
    m: object  # the M iter var, or None (A reads no spatial var of its own: GEMV-like x[k] * W[k, n])
    n: object  # the N iter var: the innermost output index
    reductions: list  # reduction iter vars, in block order
    dtype: str


# TVM 0.27 models a buffer read as ``tvm.ir.expr.TensorLoad`` (``.source`` is the buffer); ``tirx.BufferLoad``
# is only a constructor function there.
_LOAD_TYPE = getattr(tvm.ir.expr, "TensorLoad", None) or tirx.BufferLoad


def _is_load(expr) -> bool:
    return isinstance(expr, _LOAD_TYPE)


def _load_buffer(expr):
    src = getattr(expr, "source", None)
    return src if src is not None else expr.buffer


def _unwrap_load(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr if _is_load(expr) else None


def _same_index(a, b) -> bool:
    # same var object, or equal constants (two IntImm(0) are distinct objects)
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return a.value == b.value
    return a.same_as(b)


def _analyze(block: tirx.Stmt) -> _Contraction | None:
    """Match ``C[vars] = C[vars] + X * Y`` and classify the block's iter vars (see module docstring)."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or block.init is None:
        return None
    if "float" not in str(store.buffer.dtype):
        return None  # integer / bool contractions are rare; leave them to the generic rules
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    self_load, prod = value.a, value.b
    if not (_is_load(self_load) and _load_buffer(self_load).same_as(store.buffer)):
        self_load, prod = value.b, value.a
    if not (_is_load(self_load) and _load_buffer(self_load).same_as(store.buffer)):
        return None
    if len(self_load.indices) != len(store.indices) or not all(
        _same_index(a, b) for a, b in zip(self_load.indices, store.indices)
    ):
        return None
    if not isinstance(prod, tirx.Mul):
        return None
    x, y = _unwrap_load(prod.a), _unwrap_load(prod.b)
    if x is None or y is None:
        return None

    spatial = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reductions = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if not reductions or len(spatial) + len(reductions) != len(block.iter_vars):
        return None
    # The output is indexed by distinct spatial vars, or constants where normalize_prim_func dropped a unit
    # axis (a batch of 1); no offsets, no broadcasting store. Its innermost index must be a var: that is N.
    if not all(isinstance(i, (tirx.Var, tirx.IntImm)) for i in store.indices):
        return None
    out_vars = [i for i in store.indices if isinstance(i, tirx.Var)]
    if not out_vars or not isinstance(store.indices[-1], tirx.Var):
        return None
    if len({v.name for v in out_vars}) != len(out_vars):
        return None
    if not all(any(v.same_as(s) for s in spatial) for v in out_vars):
        return None
    vx, vy = vars_in(list(x.indices)), vars_in(list(y.indices))
    n = out_vars[-1]
    if n in vy and n not in vx:
        a_vars, b_vars = vx, vy
    elif n in vx and n not in vy:
        a_vars, b_vars = vy, vx
    else:
        return None  # innermost output axis read by both or neither operand: not an outer-product tile
    # Every reduction var must feed both operands' product, otherwise it is a sum of a broadcast, not a GEMM.
    red_set = set(reductions)
    if not red_set & a_vars and not red_set & b_vars:
        return None
    a_only = [v for v in spatial if v in a_vars and v not in b_vars]
    m = None
    if a_only:
        extents = {iv.var: iv.dom.extent for iv in block.iter_vars}

        def _size(v):
            e = extents[v]
            return int(e.value) if isinstance(e, tirx.IntImm) else 1 << 30  # symbolic: assume large

        # The largest A-only axis (the sequence/row axis of a dense layer, the channel axis of a conv) is M;
        # others (a dynamic batch flattened into A) stay outer. The last one wins ties: it is the one adjacent
        # to the reduction in A's layout, the usual row axis.
        m = max(reversed(a_only), key=_size)
    # (tirx Vars compare by identity of the underlying object: use same_as, never Python ``is``.)
    outer = [v for v in spatial if not v.same_as(n) and (m is None or not v.same_as(m))]
    n = [v for v in spatial if v.same_as(n)][0]
    outer_a = [v for v in outer if v in a_vars and v not in b_vars]
    return _Contraction(outer=outer, outer_a=outer_a, m=m, n=n, reductions=reductions,
                        dtype=str(store.buffer.dtype))


def _pick_tile(extent: int | None, preferred: int, lo: int) -> int:
    """A tile size <= preferred for an axis of ``extent``: the largest divisor in [lo, preferred] when one exists
    (no bounds check), the whole axis when it is smaller than ``preferred``, else ``preferred`` (predicated tail)."""
    if extent is None:
        return preferred
    if extent <= preferred:
        return extent
    for t in range(preferred, max(lo, 1) - 1, -1):
        if extent % t == 0:
            return t
    return preferred


def _register_tile(m_ext, n_ext, lanes: int, regs: int, has_m: bool, panel: int | None = None) -> tuple[int, int]:
    """Choose the register tile (MR rows x NR columns, NR = a whole number of vectors).

    Accumulators (MR x NR/lanes vector registers) may use 3/4 of the register file: 12 of AVX2's 16, 24 of
    AVX-512's 32; the rest hold the B vectors and the broadcast A scalar. Among the shapes that fill that budget
    we prefer ones whose MR divides M and NR divides N (no bounds-checked tail tile), then the most accumulators
    (more independent FMA chains hide the FMA latency), then the wider NR (fewer broadcasts per FMA).
    A constant N narrower than the tile is taken whole; a symbolic extent gets a predicated tail.
    ``panel``: the weight is packed in panels of this many columns (ember.passes.layout); NR is then the panel.
    """
    budget = max(regs * 3 // 4, 1)
    best = None
    vec_choices = (4, 3, 2, 1) if panel is None else (panel // lanes,)
    for n_vecs in vec_choices:
        nr = n_vecs * lanes
        if n_ext is not None and n_ext < nr:
            continue
        # a single-row tile wastes the broadcast; only use it when there is no M axis (or M is 1)
        lowest = 1 if (not has_m or (m_ext is not None and m_ext < 2)) else 2
        for mr in range(min(budget // n_vecs, 8), lowest - 1, -1):
            if not has_m and mr > 1:
                continue
            if has_m and m_ext is not None and m_ext < mr:
                continue
            exact = (0 if (n_ext is not None and n_ext % nr == 0) else 1) + (
                0 if (not has_m or (m_ext is not None and m_ext % mr == 0)) else 1)
            key = (exact, -(mr * n_vecs), -n_vecs)
            if best is None or key < best[0]:
                best = (key, mr, nr)
    if best is None:  # N (or M) smaller than one vector: take the axes whole
        nr = n_ext if n_ext is not None else lanes
        mr = 1 if not has_m else (min(m_ext, budget) if m_ext is not None else 4)
        return mr, nr
    _, mr, nr = best
    if has_m and m_ext is not None and m_ext <= mr:
        mr = m_ext
    return mr, nr


def panel_width(m_ext, n_ext: int, target: Target, dtype: str = "float32") -> int:
    """The register tile width NR this rule picks for an [M, K] x [K, N] product on ``target``: the width
    ember.passes.layout packs dense weights to, so each register tile reads one contiguous panel."""
    _, nr = _register_tile(m_ext, n_ext, vector_lanes(target, dtype), num_vector_registers(target), True)
    return nr


def _packed_panel(block: tirx.Stmt, n_var) -> int | None:
    """The panel width P when the block reads some operand at ``[n // P, ..., n % P]`` (a packed weight)."""
    found = []

    def _mod(node):
        if isinstance(node.a, tirx.Var) and node.a.same_as(n_var) and isinstance(node.b, tirx.IntImm):
            found.append(int(node.b.value))

    tvm_ffi.structural_walk(block.body, (tirx.FloorMod, _mod), order="post")
    return found[0] if len(set(found)) == 1 else None


def _k_block(info: _Contraction, extent_of: dict, nr: int, k_total: int, elem_bytes: int,
             target: Target) -> int | None:
    """The chunk of the innermost reduction axis to K-block by, or None to keep the plain schedule.

    The plain schedule streams a whole K x NR panel of B through every register tile of rows. For a conv on a
    small image (ResNet's 7x7x512 layers: M = 7 output columns per row, 7 output rows in ``outer_a``, K = 3 x 3
    x 512) that panel (K x NR x 4 = 590 KB) is re-read from L2 for each of the 7 rows, and the weights come
    from memory once per call: the layer is bound by the weight stream. K-blocked, each task owns one panel
    and walks the reduction in chunks that fit L1 (``kc`` x NR x 4 <= 16 KiB); every row of the image is
    swept over the chunk while it is in L1, accumulating into a per-panel tile of all rows (which must stay
    small: <= 64 KiB). 7x7x512 -> 512 conv + bias + ReLU on the 2-core AVX-512 Xeon: 0.99-1.03 -> 0.91 ms with
    warm caches, 1.46-1.51 -> 1.23-1.34 ms with the weights evicted before each call (BENCHMARKS.md).
    ``k_total``: the product of the reduction extents (the caller's).
    Taken only where it pays and keeps the cores busy: A-only outer axes to reuse the panel (conv rows), a
    panel larger than the L1 budget, at least 2 panels per core to spread, static extents, and a reduction
    whose innermost axis divides into chunks of >= 16.
    """
    if not info.outer_a or info.m is None:
        return None
    extents = [extent_of[v] for v in info.outer_a] + [extent_of[info.m], extent_of[info.n]]
    extents += [extent_of[r] for r in info.reductions]
    if any(e is None for e in extents):
        return None
    rows = extent_of[info.m]
    for v in info.outer_a:
        rows *= extent_of[v]
    n_ext = extent_of[info.n]
    if n_ext % nr or n_ext // nr < 2 * num_cores(target):
        return None
    if k_total * nr * elem_bytes <= 2 * _L1_CHUNK_BYTES or rows * nr * elem_bytes > _KBLOCK_ACC_BYTES:
        return None
    inner = extent_of[info.reductions[-1]]
    kc = min(inner, max(_L1_CHUNK_BYTES // (nr * elem_bytes), 1))
    while kc > 1 and inner % kc:
        kc -= 1
    return kc if kc >= 16 else None  # (kc == inner: the chunks are the outer reduction steps, a conv's taps)


class Matmul(ScheduleRule):
    """Register-tiled, cache-blocked, vectorized and parallel schedule for GEMM-like contractions and conv2d.

    See the module docstring for what the rule claims and why the schedule looks the way it does.
    """

    def apply(self, func, target: Target, tunable: bool):  # pylint: disable=unused-argument
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target):
            return None
        # First with cheap prologues inlined into the operand reads; if that breaks the pattern, without.
        for inline_prologue in (True, False):
            try:
                sch = self._schedule(func, target, inline_prologue)
            except Exception:  # pylint: disable=broad-except
                # A schedule primitive refused (the pattern matched but the IR shape is not one we can tile).
                sch = None
            if sch is not None:
                return sch
        return None

    # ------------------------------------------------------------------------------------------------------
    def _schedule(self, func, target, inline_prologue: bool):  # pylint: disable=too-many-locals,too-many-branches,too-many-statements
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        non_injective = [b for b in infos if not b.is_injective()]
        if len(non_injective) != 1:
            return None
        main = non_injective[0].block_rv
        if _analyze(sch.get(main)) is None:
            return None
        main_pos = [i for i, b in enumerate(infos) if b.block_rv.same_as(main)][0]
        prologue = [b.block_rv for b in infos[:main_pos]]
        epilogue = [b.block_rv for b in infos[main_pos + 1 :]]

        leftover = []  # injective blocks we keep at the root; scheduled as plain parallel loops
        for blk in reversed(prologue):
            if inline_prologue and not has_if_then_else(sch, blk):
                try:
                    sch.compute_inline(blk)
                    continue
                except Exception:  # pylint: disable=broad-except
                    pass
            leftover.append(blk)

        info = _analyze(sch.get(main))
        if info is None:
            return None
        block_stmt = sch.get(main)
        loops = sch.get_loops(main)
        if len(loops) != len(block_stmt.iter_vars):
            return None
        # After normalize_prim_func every block var is bound to exactly one loop, in the same order.
        loop_of = {iv.var: lp for iv, lp in zip(block_stmt.iter_vars, loops)}
        extent_of = {iv.var: (int(iv.dom.extent.value) if isinstance(iv.dom.extent, tirx.IntImm) else None)
                     for iv in block_stmt.iter_vars}

        lanes = vector_lanes(target, info.dtype)
        regs = num_vector_registers(target)
        n_ext = extent_of[info.n]
        m_ext = extent_of[info.m] if info.m is not None else 1
        panel = _packed_panel(block_stmt, info.n)
        if panel is not None and (panel % lanes or (n_ext is not None and n_ext % panel)):
            panel = None  # not a panel this rule could have asked for; tile as usual
        mr, nr = _register_tile(m_ext if info.m is not None else None, n_ext, lanes, regs, info.m is not None,
                                panel)

        k_total = 1
        for r in info.reductions:
            k_total *= extent_of[r] if extent_of[r] is not None else 1024
        elem_bytes = max(tvm.DataType(info.dtype).bits // 8, 1)
        kc = _k_block(info, extent_of, nr, k_total, elem_bytes, target) if nr != n_ext else None

        # ---- split the tile axes ------------------------------------------------------------------------
        n_loop = loop_of[info.n]
        n_blocked = None
        if nr == n_ext:
            n_o, n_i = None, n_loop
        else:
            n_o, n_i = sch.split(n_loop, factors=[None, nr])
        if n_o is not None and kc is None:  # (K-blocked: one panel per task, no L2 blocking of N)
            # L2 panel blocking of N: only worth it when several row tiles reuse the panel -- tiles of M, and
            # every index of the axes only A reads (a conv's output rows: without the blocking, a 3x3x512x512
            # conv on a 7x7 image would stream all 9 MB of weights from memory once per output row).
            reuse = 1
            for v in info.outer_a:
                reuse = reuse * extent_of[v] if (reuse is not None and extent_of[v] is not None) else None
            if n_ext is not None and (m_ext is None or reuse is None or reuse * (-(-m_ext // mr)) > 1):
                nb_tiles = max(_L2_PANEL_BYTES // max(k_total * elem_bytes * nr, 1), 1)
                n_tiles = (n_ext + nr - 1) // nr
                if nb_tiles < n_tiles:
                    # a divisor of the tile count, so the blocking adds no bounds check
                    while n_tiles % nb_tiles:
                        nb_tiles -= 1
                    n_blocked, n_o = sch.split(n_o, factors=[None, nb_tiles])
        if info.m is not None and mr != m_ext:
            m_o, m_i = sch.split(loop_of[info.m], factors=[None, mr])
        elif info.m is not None:
            m_o, m_i = None, loop_of[info.m]
        else:
            m_o, m_i = None, None

        # Axes both operands read (a batch-matmul's batch) go outside the N panel blocks; axes only A reads go
        # inside them, next to M, so each B panel is reused by all of them while it sits in L2.
        outer_b = [loop_of[v] for v in info.outer if not any(v.same_as(a) for a in info.outer_a)]
        outer_a = [loop_of[v] for v in info.outer if any(v.same_as(a) for a in info.outer_a)]

        red_loops = [loop_of[v] for v in info.reductions]
        if kc is not None:
            # K-blocked (see _k_block): panel-parallel tasks; the reduction steps outside the rows, a chunk of kc
            # inside them, next to the register tile.
            outer_red, inner_red = red_loops[:-1], red_loops[-1:]
            if kc < extent_of[info.reductions[-1]]:
                r_lo, r_li = sch.split(red_loops[-1], factors=[None, kc])
                outer_red, inner_red = outer_red + [r_lo], [r_li]
            red_loops = outer_red + inner_red
            order = list(outer_b) + [n_o] + outer_red + outer_a + ([m_o] if m_o is not None else []) + inner_red
            order += ([m_i] if m_i is not None else []) + [n_i]
            sch.reorder(*order)
            par_fuse = list(outer_b) + [n_o]
            tile_anchor = sch.fuse(*par_fuse) if len(par_fuse) > 1 else n_o
            sch.parallel(tile_anchor)
        else:
            order = list(outer_b)
            if n_blocked is not None:
                order.append(n_blocked)
            order += outer_a
            if m_o is not None:
                order.append(m_o)
            if n_o is not None:
                order.append(n_o)
            order += red_loops
            if m_i is not None:
                order.append(m_i)
            order.append(n_i)
            sch.reorder(*order)

            # ---- parallel over the outer tiles ------------------------------------------------------------
            par = [lp for lp in order[: len(order) - len(red_loops) - (2 if m_i is not None else 1)]]
            # ``par`` = outer..., [n_blocked], [m_o], [n_o]; keep n_o serial when there is something else to
            # spread, so that each thread walks along N reusing its A rows.
            tile_anchor = par[-1] if par else None
            par_fuse = par[:-1] if (len(par) > 1 and n_o is not None) else par
            if par_fuse:
                fused = sch.fuse(*par_fuse) if len(par_fuse) > 1 else par_fuse[0]
                sch.parallel(fused)
                if tile_anchor is not None and tile_anchor in par_fuse:
                    tile_anchor = fused

        # ---- accumulator in registers, epilogue per tile -------------------------------------------------------
        if epilogue:
            # Intermediate epilogue blocks fold into the last one; the remaining consumer reads the matmul result.
            for blk in epilogue[:-1]:
                try:
                    sch.compute_inline(blk)
                except Exception:  # pylint: disable=broad-except
                    return None
            consumer = epilogue[-1]
            if _align_consumer(sch, consumer, sch.get(main).body.buffer):
                sch.set_scope(main, 0, "local")
            else:
                # The epilogue reads the product through an index map TVM cannot invert exactly (a reshape that
                # splits the tiled row axis, see _align_consumer): computed at the tile, TVM's region analysis
                # would give it rows of other tiles. It runs after the product instead, as its own parallel loop.
                leftover.append(consumer)
                consumer = sch.cache_write(main, 0, "local")
        else:
            consumer = sch.cache_write(main, 0, "local")
        if tile_anchor is not None:
            sch.reverse_compute_at(consumer, tile_anchor, preserve_unit_loops=True)
        # (no tile loop at all: the whole output is one register tile; the consumer stays after it at the root)
        # ---- register tile: unroll rows, vectorize columns -----------------------------------------------------
        # (annotate before decompose_reduction: afterwards the update block is no longer a complete reduction
        # block and TVM refuses loop annotations over it.)
        # NR is a whole number of native vectors: split it so every vector op is exactly one register wide
        # (a single <24 x float> op would leave the register allocation to LLVM's legalizer, which spills).
        if nr > lanes and nr % lanes == 0:
            n_v, n_l = sch.split(n_i, factors=[None, lanes])
            sch.unroll(n_v)
            sch.vectorize(n_l)
        else:
            sch.vectorize(n_i)
        if m_i is not None and const_extent(sch, m_i) is not None:
            sch.unroll(m_i)
        init = sch.decompose_reduction(main, red_loops[0])
        init_loops = sch.get_loops(init)
        if sch.get(init_loops[-1]).kind != tirx.ForKind.VECTORIZED:
            sch.vectorize(init_loops[-1])
        # Small reduction windows (a 3x3 conv's ry/rx) unroll into straight-line FMAs (not when K-blocked: they
        # are outside the rows there, and unrolling would copy the whole row sweep).
        for lp in (red_loops[1:] if kc is None else []):
            ext = const_extent(sch, lp)
            if ext is not None and ext <= 7:
                sch.unroll(lp)

        cons_loops = sch.get_loops(consumer)
        if cons_loops:
            inner = cons_loops[-1]
            ext = const_extent(sch, inner)
            if ext is not None and ext > lanes and ext % lanes == 0:
                _, v = sch.split(inner, factors=[None, lanes])
                sch.vectorize(v)
            elif ext is not None and ext > 1:
                sch.vectorize(inner)

        for blk in leftover:
            _parallel_injective(sch, blk, lanes)
        return sch


def _loads_of(stmt, buffer) -> list:
    found = []

    def _visit(node):
        if _load_buffer(node).same_as(buffer):
            found.append(node)

    tvm_ffi.structural_walk(stmt, (_LOAD_TYPE, _visit), order="post")
    return found


def _reads_plainly(sch: s_tir.Schedule, consumer, buffer) -> bool:
    """Whether every read of ``buffer`` in the block is at the same indices, each a distinct block iter var or a
    constant: then the block's iteration space maps 1:1 onto the producer's, and a tile of the producer is
    a box of the consumer's iterations."""
    stmt = sch.get(consumer)
    loads = _loads_of(stmt.body, buffer)
    if not loads:
        return False
    first = list(loads[0].indices)
    if any(len(ld.indices) != len(first) or not all(_same_index(a, b) for a, b in zip(ld.indices, first))
           for ld in loads[1:]):
        return False
    block_vars = [iv.var for iv in stmt.iter_vars]
    used = [i for i in first if isinstance(i, tirx.Var)]
    if len(used) + sum(isinstance(i, tirx.IntImm) for i in first) != len(first):
        return False
    return len({v.name for v in used}) == len(used) and all(any(v.same_as(b) for b in block_vars) for v in used)


def _align_consumer(sch: s_tir.Schedule, consumer, buffer) -> bool:
    """Make the epilogue block iterate over the product's own index space, so it can be computed per tile.

    An epilogue across a reshape reads the product at a *computed* row, e.g. ``y[b, s, j] = C[(b * S + s) %
    (batch * S), j] + r[b, s, j]`` for a ``[batch * S, N]`` product viewed as ``[batch, S, N]``. Computed at a
    tile of 8 rows of C, ``reverse_compute_at`` must find the (b, s) box those rows are; when 8 rows straddle a
    ``b`` boundary (S = 13, or a symbolic batch) they are no box, and TVM 0.27 picks a wrong one -- the
    epilogue then read rows no tile had computed (NaN) or skipped some (tests/schedules/test_cpu_rules.py,
    ``test_epilogue_across_reshape``). So when the read is not plain (:func:`_reads_plainly`), the block's
    iteration space is re-indexed by the read itself (``transform_block_layout``: (b, s, j) -> (b * S + s,
    j)); TVM accepts that only if the map is a bijection onto the product's box, and the read then becomes
    ``C[i, j]``. Returns whether the block now reads plainly; if not, the caller keeps it out of the tile.
    """
    if _reads_plainly(sch, consumer, buffer):
        return True
    stmt = sch.get(consumer)
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars):
        return False
    loads = _loads_of(stmt.body, buffer)
    if not loads or len(loads[0].indices) != len(buffer.shape):
        return False
    block_vars = [iv.var for iv in stmt.iter_vars]
    try:
        sch.transform_block_layout(consumer, tirx.IndexMap(block_vars, list(loads[0].indices), None))
    except Exception:  # pylint: disable=broad-except
        return False  # not a bijection TVM can prove (the schedule is unchanged by a failed primitive)
    return _reads_plainly(sch, consumer, buffer)


def _parallel_injective(sch: s_tir.Schedule, blk, lanes: int) -> None:
    """A root-level injective block (e.g. conv padding): parallel outer loops, vectorized inner loop."""
    from .elementwise import schedule_injective_block  # pylint: disable=import-outside-toplevel

    schedule_injective_block(sch, blk, lanes)
