"""Decode-shaped matmuls on GPUs (a few rows of activations times a weight matrix): ember's GEMV rule.

A GEMV with batch 1..8 reads every weight once and does two flops per weight: it is bound by memory bandwidth, so
the schedule is about reading the weight matrix at full speed and reading it only once:

* every thread loads 16 bytes of weights per instruction (``ld.global.v4``: 8 fp16 or 4 fp32 values, the widest
  load a CUDA thread has), and consecutive threads read consecutive 16-byte chunks, so a warp reads 512 contiguous
  bytes;
* all batch rows (at most ``MAX_BATCH``) are computed by the thread that holds the weights in registers, so the
  weights are read once whatever the batch;
* the reduction over K is split over the threads (split-K); the partial sums meet in a cross-thread reduction
  that TVM lowers to warp shuffles (``threadIdx.x``) or a shared-memory tree (``threadIdx.y``).

Two weight layouts, both seen in practice:

* ``W[N, K]`` (``nn.Linear``'s layout, K contiguous: "inner reduction"): one warp per output row, the 32 lanes
  split K in 16-byte chunks, a warp-shuffle all-reduce at the end. ``ROWS_PER_BLOCK`` warps per block.
* ``W[K, N]`` (weights transposed ahead of time, N contiguous: "outer reduction"): each thread owns 16 bytes of
  consecutive output columns and walks a slice of K; the threads of a block split K (``threadIdx.y``) and the
  slices meet in a shared-memory reduction.

The rule never changes what the kernel computes (same dtypes, same accumulation type as the kernel asks for); only
the order of the additions differs, as with any parallel reduction.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.target import Target

from .common import analyze_matmul, is_gpu

MAX_BATCH = 8  # beyond this the kernel is a (skinny) GEMM: tensor cores pay off, and registers run out
ROWS_PER_BLOCK = 4  # inner reduction: warps per block, one output row each
WARP = 32
LOAD_BYTES = 16  # one 128-bit load per thread


def _vector_len(dtype: str, extent: int, lanes: int) -> int:
    """Elements per 16-byte load, halved until ``lanes`` threads times it divides ``extent`` (no ragged tail)."""
    vec = max(LOAD_BYTES * 8 // tvm.DataType(dtype).bits, 1)
    while vec > 1 and extent % (lanes * vec) != 0:
        vec //= 2
    return vec


class GEMV:
    """Claims matmul kernels whose activation side has at most ``MAX_BATCH`` rows (see module doc)."""

    def __init__(self, max_batch: int = MAX_BATCH):
        self.max_batch = max_batch

    def __repr__(self) -> str:
        return f"ember.GEMV(max_batch={self.max_batch})"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool = False) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not is_gpu(target):
            return None
        sch = s_tir.Schedule(func)
        mm = analyze_matmul(sch)
        if mm is None:
            return None
        batch, n, k = mm.batch, mm.n, mm.k
        if batch is None or n is None or k is None or batch > self.max_batch:
            return None
        epilogue = mm.epilogue
        b_loop, n_loop, k_loop = mm.normalize_loops(sch)
        if mm.inner_reduction:
            return self._inner(sch, mm, b_loop, n_loop, k_loop, k, epilogue)
        return self._outer(sch, mm, b_loop, n_loop, k_loop, n, k, epilogue)

    # -- W[N, K]: a warp per row, lanes split K, warp-shuffle all-reduce -----------------------------------------
    def _inner(self, sch, mm, b_loop, n_loop, k_loop, k, epilogue):
        vec = _vector_len(mm.weight_dtype, k, WARP)
        block = mm.block
        ko, tx, v = sch.split(k_loop, [None, WARP, vec])
        sch.reorder(b_loop, n_loop, tx, ko, v)
        rf = sch.rfactor(tx, factor_axis=0)
        # The write-back block (sum over the 32 lanes) keeps the loop nest b, n, tx; the lanes' partial sums
        # (the rfactor block, in registers) are computed inside it, per row, for all batch rows at once.
        wb_b, wb_n, wb_tx = sch.get_loops(block)
        wbx, wty = sch.split(wb_n, [None, ROWS_PER_BLOCK])
        sch.reorder(wbx, wty, wb_b, wb_tx)
        sch.bind(wbx, "blockIdx.x")
        sch.bind(wty, "threadIdx.y")
        sch.bind(wb_tx, "threadIdx.x")
        sch.compute_at(rf, wty, preserve_unit_loops=True)
        sch.set_scope(rf, 0, "local")
        # compute_at generated the rf loops under wty in the block's iterator order: tx, [batch], n (unit), ko, v.
        # Make it tx, ko, [batch], n, v: the weight chunk loaded at ko serves every batch row.
        r_loops = sch.get_loops(rf)[2:]
        r_tx, middle, r_ko, r_v = r_loops[0], r_loops[1:-2], r_loops[-2], r_loops[-1]
        sch.reorder(r_tx, r_ko, *middle, r_v)
        r_b = middle[0]
        sch.bind(r_tx, "threadIdx.x")
        self._cache_vector_loads(sch, rf, r_ko, mm)
        sch.decompose_reduction(rf, r_ko)
        if len(middle) > 1:
            sch.unroll(r_b)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, wty)
        return sch

    # -- W[K, N]: a thread per 16 bytes of columns, threads split K, shared-memory reduction ---------------------
    def _outer(self, sch, mm, b_loop, n_loop, k_loop, n, k, epilogue):
        vec = max(LOAD_BYTES * 8 // tvm.DataType(mm.weight_dtype).bits, 1)
        while vec > 1 and n % vec:
            vec //= 2
        # Enough blocks to fill the GPU (>= ~256) before wide rows: 8 lanes x 16 B = 128 B per row and warp.
        tx_n = 8
        while tx_n > 1 and (n % (tx_n * vec) or n // (tx_n * vec) < 256):
            tx_n //= 2
        ty_k = max(min(256 // tx_n, 64), 1)
        while ty_k > 1 and k % ty_k:
            ty_k //= 2
        block = mm.block
        ko, ty = sch.split(k_loop, [None, ty_k])
        sch.reorder(b_loop, n_loop, ty, ko)
        rf = sch.rfactor(ty, factor_axis=0)
        wb_b, wb_n, wb_ty = sch.get_loops(block)
        wbx, wtx, wv = sch.split(wb_n, [None, tx_n, vec])
        sch.reorder(wbx, wtx, wv, wb_b, wb_ty)
        sch.bind(wbx, "blockIdx.x")
        sch.bind(wtx, "threadIdx.x")
        sch.bind(wb_ty, "threadIdx.y")
        sch.compute_at(rf, wtx, preserve_unit_loops=True)
        sch.set_scope(rf, 0, "local")
        # rf loops under wtx, in the block's iterator order: ty, [batch], n (vec), ko -> ty, ko, [batch], n.
        r_loops = sch.get_loops(rf)[2:]
        r_ty, middle, r_ko = r_loops[0], r_loops[1:-1], r_loops[-1]
        sch.reorder(r_ty, r_ko, *middle)
        r_b = middle[0]
        sch.bind(r_ty, "threadIdx.y")
        self._cache_vector_loads(sch, rf, r_ko, mm)
        sch.decompose_reduction(rf, r_ko)
        if len(middle) > 1:
            sch.unroll(r_b)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, wtx)
        return sch

    @staticmethod
    def _cache_vector_loads(sch, rf, ko, mm):
        """Stage the weight chunk (and the activations it meets) in registers with one vector load per row."""
        stmt = sch.get(rf)
        for idx, region in enumerate(stmt.reads):
            if region.source.same_as(mm.weight) or region.source.same_as(mm.act):
                cache = sch.cache_read(rf, idx, "local")
                sch.compute_at(cache, ko, preserve_unit_loops=True)
                loops = sch.get_loops(cache)
                inner = loops[-1]
                if region.source.same_as(mm.weight) or mm.inner_reduction:
                    sch.vectorize(inner)
                else:
                    sch.unroll(inner)
