"""Row-wise normalization kernels (layer norm, RMS norm, their fused residual add and casts) with one warp per row.

Why ember has its own: dlight's ``GeneralReduction`` gives every row a block of 256 threads and reduces across
the block (shared memory and ``__syncthreads`` per statistic). A transformer's rows are short (MiniLM: 384
values), so 256 threads hold 1.5 values each and most of the kernel is synchronisation; at batch 32 there are
4096 such rows per layer norm.

This rule takes the same kernels (leading spatial axes = rows, trailing reduction axes = the normalized
values, every statistic a reduction over the row, the last block writing the row) and schedules::

    for row_block in blockIdx.x:              # ROWS rows per block, one warp each (threadIdx.y)
      for row in threadIdx.y:
        mean = warp_allreduce(sum over lane's values)    # threadIdx.x = 32 lanes, each a strided part of the row
        var  = warp_allreduce(...)                        # statistics live in registers ("local"), no shared memory
        out[row, lane + 32 * i] = ...                     # producers (casts, residual add) inlined into each read

The reductions are cross-thread reductions over ``threadIdx.x`` only, which TVM lowers to warp shuffles
(``__shfl_down_sync``) with no ``__syncthreads``. The row is re-read from global memory by each pass; after the
first pass it comes from L1 (a row of two fp16 inputs is 1.5 KiB). It declines anything else (the next rule,
dlight's, takes it).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.target import Target

from .common import is_gpu

WARP = 32
MAX_ROWS_PER_BLOCK = 8
TARGET_BLOCKS = 264  # two blocks per SM of an H100 (132 SMs)
MAX_ROW = 4096  # longer rows keep dlight's block-wide reduction (more threads per row)


def rows_per_block(rows: int | None) -> int:
    """Warps (rows) per block: as many as keep ~TARGET_BLOCKS blocks, 1..MAX_ROWS_PER_BLOCK, a power of two."""
    if rows is None:
        return 4
    r = 1
    while r < MAX_ROWS_PER_BLOCK and rows // (r * 2) >= TARGET_BLOCKS:
        r *= 2
    return r


def _static_extent(loop_extent) -> int | None:
    return int(loop_extent) if isinstance(loop_extent, (int, tirx.IntImm)) else None


class RowNorm:
    """Warp-per-row schedule for layer norm / RMS norm style kernels on NVIDIA GPUs (see module doc)."""

    def __repr__(self) -> str:
        return "ember.RowNorm()"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool = False) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not is_gpu(target) or target.kind.name != "cuda":
            return None
        try:
            return _schedule(func)
        except Exception:  # pylint: disable=broad-except
            return None  # a kernel of another shape: dlight's rules take it


def _schedule(func: tirx.PrimFunc) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    infos = try_inline_contiguous_spatial(sch, infos)
    if not infos or len(infos) < 2:
        return None
    dom_kind = infos[0].dom_kind()
    n_s = len(dom_kind) - len(dom_kind.lstrip("S"))
    n_r = len(dom_kind) - len(dom_kind.rstrip("R"))
    # Statistics blocks: reductions over the same rows; then the blocks that write the row (spatial, same domain;
    # several when the kernel has several outputs, e.g. the norm in fp32 and its fp16 copy).
    if n_r != 1 or n_s < 1 or n_s + n_r != len(dom_kind):
        return None
    n_stats = 0
    while n_stats < len(infos) and infos[n_stats].dom_kind() == dom_kind:
        n_stats += 1
    writers = infos[n_stats:]
    if n_stats == 0 or not writers:
        return None
    for info in writers:
        if not info.is_injective() or info.dom_kind() != "S" * len(dom_kind):
            return None
    last, extra = writers[0], writers[1:]
    row_len = _static_extent(sch.get(sch.get_loops(last.block_rv)[-1]).extent)
    if row_len is None or row_len < WARP or row_len > MAX_ROW:
        return None
    # The output's last axis must be the reduced axis (its loops align with the statistics' loops).
    loops = sch.get_loops(last.block_rv)
    rows = 1
    for lp in loops[:n_s]:
        ext = _static_extent(sch.get(lp).extent)
        rows = None if ext is None or rows is None else rows * ext
    per_block = rows_per_block(rows)

    row = sch.fuse(*loops[:n_s])
    bx, ty = sch.split(row, [None, per_block])
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    inner, tx = sch.split(loops[-1], [None, WARP])
    sch.reorder(tx, inner)
    sch.bind(tx, "threadIdx.x")
    sch.annotate(inner, ann_key="pragma_auto_unroll_max_step", ann_val=256)
    sch.annotate(inner, ann_key="pragma_unroll_explicit", ann_val=1)
    for info in extra:  # further outputs of the row: same lanes, so each thread reads back what it wrote
        sch.reverse_compute_at(info.block_rv, ty, preserve_unit_loops=True)
        e_inner, e_tx = sch.split(sch.get_loops(info.block_rv)[-1], [None, WARP])
        sch.reorder(e_tx, e_inner)
        sch.bind(e_tx, "threadIdx.x")
        sch.annotate(e_inner, ann_key="pragma_auto_unroll_max_step", ann_val=256)
        sch.annotate(e_inner, ann_key="pragma_unroll_explicit", ann_val=1)
    for info in reversed(infos[:n_stats]):
        block = info.block_rv
        for i, _ in enumerate(sch.get(block).writes):
            sch.set_scope(block, buffer_index=i, storage_scope="local")
        sch.compute_at(block, ty, preserve_unit_loops=True)
        r_loop = sch.get_loops(block)[-1]
        r_loop, tx_r = sch.split(r_loop, [None, WARP])
        sch.reorder(tx_r, r_loop)
        sch.bind(tx_r, "threadIdx.x")
        sch.annotate(r_loop, ann_key="pragma_auto_unroll_max_step", ann_val=256)
        sch.annotate(r_loop, ann_key="pragma_unroll_explicit", ann_val=1)
    return sch
