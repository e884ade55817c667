"""The GPU sparse matmul kernel (CUDA, ROCm, Metal, any TVM GPU backend), written out as TIR.

It reads the GPU layout of :func:`.pack.pack_gpu` (``values [NB, GO, n, 16, V]``, ``indices [NB, GO, n, 16, IB]``)
and computes ``y[b, j] = Σ_g Σ_s value(j, g, s) * x[b, g*m + position(j, g, s)]`` in fp32, stored as the weight
dtype (or fp32: ``out_dtype``).

Why this shape (a batch-1 GEMV reads each weight byte once, so the kernel lives or dies by memory traffic):

* One thread block per (16-row block, batch row): 4096 output rows give 256 blocks, two per SM on an H100's 132.
* Its 16 × L threads: ``threadIdx.x`` is the row (16), ``threadIdx.y`` one of L lanes that split the row block's
  (group vector, slot) chunks between them. Per chunk a thread issues one 16-byte load of V values and one 4-8 byte
  load of its indices; the 16 rows of a chunk are 256 contiguous bytes, so a warp's loads are fully coalesced.
  The chunk loop is unrolled, so the loads of all chunks are in flight together (what a memory-bound kernel needs).
* The gathers of x: in a chunk the 16 threads of one row block read the same ``m``-wide slice of x (one 32-byte
  sector for fp16 at m = 16), which stays in L1/L2 — x is read from memory once, not once per row.
* The L partial sums of a row meet in shared memory (one store per thread, one barrier, L loads for the first
  lane): no warp shuffles, so the same TIR compiles for warp-32 CUDA/Metal and wave-64 ROCm.

For fp16, 1:16, K = 11008: V = 8, 4-bit indices, 86 chunks per row block, L = 32 on CUDA (:func:`lanes_for`).
"""

from __future__ import annotations

from tvm import tirx

from .pack import BLOCK, gpu_vector, index_bits, num_blocks, num_groups

CHUNKS_PER_THREAD = 3  # measured on the H100 (BENCHMARKS.md "N:M sparsity on the H100"), see lanes_for
UNROLL = 8  # chunks per unrolled step of the chunk loop: enough loads in flight without exploding the code


def lanes_for(chunks: int, max_threads: int = 1024) -> int:
    """Threads per row (a power of two): about ``CHUNKS_PER_THREAD`` chunks each, at most ``max_threads / 16``.

    Measured on an H100, 4096x11008 fp16 batch 1, weights from HBM (benchmarks/sparse_gpu_bench.py): at 1:16 (86
    chunks per row) 8/16/32/64 lanes took 8.6/6.7/5.2/5.1 us; at 1:8 (172 chunks) 23.3/9.9/8.5/7.4 us; at 2:4
    (688) 54.9/30.3/26.0/28.7 us (run 2; run 3 agrees within ~10%). Fewer lanes leave too few loads in flight
    per SM; more than ~3 chunks per thread queue them behind each other. ROCm and Metal allow 256 threads per block: 16 lanes there.
    """
    want = -(-chunks // CHUNKS_PER_THREAD)
    lanes = 1
    while lanes < want and lanes * 2 * BLOCK <= max_threads:
        lanes *= 2
    return lanes


def gpu_kernel(k: int, n_out: int, n: int, m: int, dtype: str, vector_loads: bool = True,
               emulate: bool = False, lanes: int | None = None, max_threads: int = 256,
               out_dtype: str | None = None) -> tirx.PrimFunc:
    """The kernel for a weight ``[n_out, k]`` packed by :func:`.pack.pack_gpu`; the batch is symbolic.

    vector_loads: load a chunk's values and indices as one vector each (CUDA, ROCm). Metal's shading language has
    no 8-wide half vector, so there the copies are unrolled scalar loads (the Metal compiler merges them).
    out_dtype: the output's dtype (default ``dtype``; fp16 inputs with an fp32 output is what ``precision="fp16"``
    makes of a matmul, and the kernel accumulates in fp32 anyway).
    lanes: threads per row (a power of two; 16 × lanes threads per block); default :func:`lanes_for` with the
    target's ``max_threads`` per block.
    emulate: the same arithmetic with serial loops instead of threads (phase 1 every thread's partial sum, phase
    2 the reduction), which compiles for a CPU: the tests check the index arithmetic here, without a GPU.
    """
    import numpy as np
    from tvm.script import tirx as T

    v = gpu_vector(np.dtype(dtype) if dtype != "bfloat16" else np.float16)
    out_dtype = out_dtype or dtype
    four_bit = index_bits(m) == 4
    ib = v // 2 if four_bit else v
    g_all = num_groups(k, m)
    go = -(-g_all // v)
    nb = num_blocks(n_out)
    chunks = go * n
    lanes = lanes or lanes_for(chunks, max_threads)
    iters = -(-chunks // lanes)
    unroll = min(UNROLL, iters)
    outer = -(-iters // unroll)
    guard_chunk = outer * unroll * lanes != chunks
    guard_group = go * v != g_all
    guard_row = nb * BLOCK != n_out

    def copy(n_elems):
        return T.vectorized(n_elems) if vector_loads and not emulate else T.unroll(n_elems)

    def chunk(ty, i0, i1):  # the chunk (group vector, slot) a lane handles at step (i0, i1)
        return ty + lanes * (i0 * unroll + i1)

    def chunk_ok(c):  # the last step may run past the chunks (a constant True when it never does)
        return c < chunks if guard_chunk else T.bool(True)

    def row_ok(r):
        return r < n_out if guard_row else T.bool(True)

    def column(il, i1, c, q):  # the column of x that slot (c, q) multiplies
        if four_bit:
            pos = T.bitwise_and(T.shift_right(il[i1, q // 2], T.uint8((q % 2) * 4)), T.uint8(15))
        else:
            pos = il[i1, q]
        return T.Cast("int64", ((c // n) * v + q) * m + T.Cast("int32", pos))

    def product(x, vl, il, b, i1, c, q):
        term = T.Cast("float32", vl[i1, q]) * T.Cast("float32", x[b, column(il, i1, c, q)])
        if guard_group:  # the last vector's missing groups point past x: never read them
            return T.if_then_else((c // n) * v + q < g_all, term, T.float32(0))
        return term

    @T.macro
    def partial_sum(acc, vl, il, x, values, indices, b, jb, ty, tx):
        acc[0] = T.float32(0)
        for i0 in range(outer):
            # the loads of a whole step first, then its arithmetic: the loads are in flight together
            for i1 in T.unroll(unroll):
                if chunk_ok(chunk(ty, i0, i1)):
                    for e in copy(v):
                        vl[i1, e] = values[jb, chunk(ty, i0, i1) // n, chunk(ty, i0, i1) % n, tx, e]
                    for e in copy(ib):
                        il[i1, e] = indices[jb, chunk(ty, i0, i1) // n, chunk(ty, i0, i1) % n, tx, e]
            for i1 in T.unroll(unroll):
                if chunk_ok(chunk(ty, i0, i1)):
                    for q in T.unroll(v):
                        acc[0] = acc[0] + product(x, vl, il, b, i1, chunk(ty, i0, i1), q)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, v_h: T.handle, i_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(x_h, (batch, k), dtype)
        values = T.match_buffer(v_h, (nb, go, n, BLOCK, v), dtype)
        indices = T.match_buffer(i_h, (nb, go, n, BLOCK, ib), "uint8")
        y = T.match_buffer(y_h, (batch, n_out), out_dtype)
        for b in T.thread_binding(batch, thread="blockIdx.y"):
            for jb in T.thread_binding(nb, thread="blockIdx.x"):
                red = T.decl_buffer((lanes, BLOCK), "float32", scope="shared")
                for ty in T.thread_binding(lanes, thread="threadIdx.y"):
                    for tx in T.thread_binding(BLOCK, thread="threadIdx.x"):
                        acc = T.decl_buffer((1,), "float32", scope="local")
                        vl = T.decl_buffer((unroll, v), dtype, scope="local")
                        il = T.decl_buffer((unroll, ib), "uint8", scope="local")
                        partial_sum(acc, vl, il, x, values, indices, b, jb, ty, tx)
                        red[ty, tx] = acc[0]
                        T.tvm_storage_sync("shared")
                        if ty == 0:
                            for l in range(1, lanes):
                                acc[0] = acc[0] + red[l, tx]
                            if row_ok(jb * BLOCK + tx):
                                y[b, jb * BLOCK + tx] = T.Cast(out_dtype, acc[0])

    @T.prim_func(private=True)
    def emulated(x_h: T.handle, v_h: T.handle, i_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(x_h, (batch, k), dtype)
        values = T.match_buffer(v_h, (nb, go, n, BLOCK, v), dtype)
        indices = T.match_buffer(i_h, (nb, go, n, BLOCK, ib), "uint8")
        y = T.match_buffer(y_h, (batch, n_out), out_dtype)
        for b in range(batch):
            for jb in range(nb):
                red = T.decl_buffer((lanes, BLOCK), "float32")
                for ty in range(lanes):
                    for tx in range(BLOCK):
                        acc = T.decl_buffer((1,), "float32")
                        vl = T.decl_buffer((unroll, v), dtype)
                        il = T.decl_buffer((unroll, ib), "uint8")
                        partial_sum(acc, vl, il, x, values, indices, b, jb, ty, tx)
                        red[ty, tx] = acc[0]
                for tx in range(BLOCK):
                    if row_ok(jb * BLOCK + tx):
                        total = T.decl_buffer((1,), "float32")
                        total[0] = red[0, tx]
                        for l in range(1, lanes):
                            total[0] = total[0] + red[l, tx]
                        y[b, jb * BLOCK + tx] = T.Cast(out_dtype, total[0])

    return emulated if emulate else kernel
