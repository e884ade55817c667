"""ember's sparse matmul kernel: ``y[b, j] = Σ_g Σ_s values[g, s, j] * x[b, g*m + index(g, s, j)]``.

It reads only the packed weights of :mod:`.pack` (values + 4/8-bit indices), so the multiply-adds and the weight
bytes are ``n/m`` of the dense ones: 1:16 does 1/16 of the work. In TVMScript, before scheduling::

    @T.prim_func
    def sparse_matmul(x: T.Buffer((B, K), "float32"), values: T.Buffer((NB, G, n, 16), "float32"),
                      indices: T.Buffer((NB, G2, n, 16), "uint8"), y: T.Buffer((B, N), "float32")):
        for b, j, g, s in T.grid(B, N, G, n):
            with T.block("sparse_matmul"):
                ...
                y[b, j] += values[j // 16, g, s, j % 16] * x[b, g * m + ((indices[j // 16, g // 2, s, j % 16] >> (g % 2 * 4)) & 15)]

Schedules (the function is returned marked ``tirx.is_scheduled`` so ember's generic rules leave it alone):

* x86 with AVX-512 or AVX2 (:func:`_gather_kernel`, written by hand): the loop over 16-row blocks is parallel over
  the cores; per block and batch row the accumulators live in registers, the group loop runs over pairs of
  groups (so the nibble shift is a constant), and each step is one vector load of values, one of index bytes, a
  hardware gather of x by index (``vgatherdps``) and one FMA. A block's packed weights are one contiguous stream
  that stays in L1/L2 while the batch loop reuses it.
* x86, many rows (a static row count ≥ 16, e.g. seq 128): :mod:`.rows_kernel` — vectors along the rows of
  x^T instead of a gather (4.5-7x faster than the gather kernel at 128 rows on MiniLM's shapes); the rewrite picks
  it.
* other CPUs (:func:`schedule_cpu`): the same loop nest from TE with TVM's vectorizer (the gather becomes scalar
  loads); ARM and x86 without AVX2 use it.
* GPUs (CUDA, ROCm, Metal, any TVM GPU kind): :mod:`.gpu_kernel`, on the GPU layout of :func:`.pack.pack_gpu`
  (16-byte vector loads, 16 lanes per row, a shared-memory reduction). Use :func:`is_gpu` / :func:`pack_for` to
  pack for the kernel that :func:`sparse_matmul_func` returns.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from ...errors import ConfigError
from .pack import BLOCK, index_bits, index_rows, num_blocks, num_groups

KERNEL_NAME = "ember_sparse_matmul"


def _i64(v):
    return tirx.IntImm("int64", int(v)) if isinstance(v, int) else v


def sparse_matmul_te(batch, k: int, n_out: int, n: int, m: int, dtype: str = "float32", int8: bool = False):
    """The compute definition (TE): returns ``(x, values, indices, y)`` — ``(x, values, indices, scales, y)`` with
    int8 values (``y = Σ value * scale[row] * x``); ``batch`` may be an int or a tirx.Var."""
    g = num_groups(k, m)
    nb = num_blocks(n_out)
    x = te.placeholder((_i64(batch), _i64(k)), dtype, name="x")
    values = te.placeholder((_i64(nb), _i64(g), _i64(n), _i64(BLOCK)), "int8" if int8 else dtype, name="values")
    scales = te.placeholder((_i64(nb * BLOCK),), "float32", name="scales") if int8 else None
    indices = te.placeholder((_i64(nb), _i64(index_rows(g, m)), _i64(n), _i64(BLOCK)), "uint8", name="indices")
    rg = te.reduce_axis((_i64(0), _i64(g)), name="g")
    rs = te.reduce_axis((_i64(0), _i64(n)), name="s")

    def column(gi, si, j):
        if index_bits(m) == 4:
            byte = indices[j // BLOCK, gi // 2, si, j % BLOCK]
            pos = (byte >> ((gi % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")
        else:
            pos = indices[j // BLOCK, gi, si, j % BLOCK]
        return gi * _i64(m) + pos.astype("int64")

    def weight(gi, si, j):
        v = values[j // BLOCK, gi, si, j % BLOCK]
        return v.astype(dtype) * scales[j] if int8 else v

    y = te.compute(
        (_i64(batch), _i64(n_out)),
        lambda b, j: te.sum(weight(rg, rs, j) * x[b, column(rg, rs, j)], axis=[rg, rs]),
        name="sparse_matmul",
    )
    return (x, values, indices, scales, y) if int8 else (x, values, indices, y)


def _prim_func(batch, k, n_out, n, m, dtype, int8=False) -> tirx.PrimFunc:
    tensors = sparse_matmul_te(batch, k, n_out, n, m, dtype, int8)
    # create_prim_func names every function "main" (global_symbol): that would clash in a module, and an
    # exported symbol keeps the function alive through dead-code elimination. The module names it.
    return te.create_prim_func(list(tensors)).without_attr("global_symbol")


def _row_lanes(n_out: int, lanes: int) -> int:
    """The widest vector (≤ lanes, a power of two) that divides the row count, so no row block needs a tail."""
    v = lanes
    while v > 1 and n_out % v:
        v //= 2
    return v


def schedule_cpu(func: tirx.PrimFunc, target, n_out: int, k: int, m: int, dtype: str) -> tirx.PrimFunc:
    from tvm import s_tir

    from ...schedules.cpu.common import num_cores, vector_lanes

    lanes = _row_lanes(n_out, min(vector_lanes(target, dtype), BLOCK))
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("sparse_matmul")
    b, j, g, s = sch.get_loops(blk)
    jo, ji = sch.split(j, factors=[None, lanes])
    groups = num_groups(k, m)
    if index_bits(m) == 4 and groups > 1:
        # Pairs of groups: the inner pair loop is unrolled, so each nibble shift is a constant.
        g2, gp = sch.split(g, factors=[None, 2])
        sch.reorder(jo, b, g2, gp, s, ji)
        sch.unroll(gp)
    else:
        sch.reorder(jo, b, g, s, ji)
    # The accumulator: one vector register per row block, written to y once.
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, b, preserve_unit_loops=True)
    # Loop annotations first: parallel/vectorize need complete reduction blocks, which decompose_reduction ends.
    if num_cores(target) > 1 and n_out // lanes > 1:
        sch.parallel(jo)
    sch.vectorize(ji)
    sch.vectorize(sch.get_loops(acc)[-1])
    init = sch.decompose_reduction(blk, sch.get_loops(blk)[2])
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


GPU_KINDS = ("cuda", "rocm", "metal", "vulkan", "opencl", "webgpu")


def is_gpu(target) -> bool:
    return target is not None and target.kind.name in GPU_KINDS


def pack_for(target, w, n: int, m: int):
    """The packed form the kernel for ``target`` reads (GPU layout on GPU targets, else the CPU one)."""
    from .pack import pack, pack_gpu

    return pack_gpu(w, n, m) if is_gpu(target) else pack(w, n, m)


def _has_feature(target, feature: str) -> bool:
    from tvm.target.codegen import target_has_features

    try:
        return bool(target_has_features(feature, target))
    except Exception:  # pylint: disable=broad-except  (a non-x86 triple knows no x86 feature)
        return False


def gather_isa(target, dtype: str) -> str | None:
    """Which hardware gather the CPU kernel can use: "avx512" (16 fp32 lanes), "avx2" (8) or None."""
    if target is None or target.kind.name != "llvm" or dtype != "float32":
        return None
    if _has_feature(target, "avx512f"):
        return "avx512"
    if _has_feature(target, "avx2"):
        return "avx2"
    return None


def _gather_kernel(k: int, n_out: int, n: int, m: int, isa: str, parallel: bool, int8: bool = False) -> tirx.PrimFunc:
    """The x86 kernel, written out by hand: TVM's vectorizer turns a load at a non-affine vector index into one
    scalar load per lane (16 loads + 16 inserts), so the gather of x is an explicit ``vgatherdps``: 2.3× faster
    on 4096×4096 1:16 here (0.82 vs 1.88 ms). One pass over a row block's contiguous packed stream keeps
    ``BLOCK / lanes`` vector accumulators (1 with AVX-512, 2 with AVX2); a last, partial block stores lane by lane.
    """
    from tvm.script import tirx as T

    lanes = 16 if isa == "avx512" else 8
    halves = BLOCK // lanes
    vt, it = f"float32x{lanes}", f"int32x{lanes}"
    g_all = num_groups(k, m)
    four_bit = index_bits(m) == 4
    gi_rows = index_rows(g_all, m)
    pairs = g_all // 2 if four_bit else 0
    odd = four_bit and g_all % 2 == 1
    nb = num_blocks(n_out)
    full = n_out // BLOCK
    rem = n_out - full * BLOCK

    def gather(base, pos):
        if isa == "avx512":
            return T.call_llvm_intrin(vt, "llvm.x86.avx512.mask.gather.dps.512", T.Broadcast(T.float32(0), lanes),
                                      base, pos, T.Broadcast(T.bool(True), lanes), T.int32(4))
        return T.call_llvm_intrin(vt, "llvm.x86.avx2.gather.d.ps.256", T.Broadcast(T.float32(0), lanes), base, pos,
                                  T.reinterpret(vt, T.Broadcast(T.int32(-1), lanes)), T.int8(4))

    def nib(byte, p):  # positions in group 2i+p from a vector of index bytes
        return T.bitwise_and(T.shift_right(byte, T.Broadcast(T.int32(p * 4), lanes)), T.Broadcast(T.int32(15), lanes))

    def col(g):  # first column of group g, as a vector
        return T.Broadcast(T.Cast("int32", g * m), lanes)

    def lane(h):
        return T.Ramp(h * lanes, 1, lanes)

    def weight(values, jb, g, s, h):  # a vector of 16-row values as fp32 (int8 codes: converted, scaled later)
        return T.Cast(vt, values[jb, g, s, lane(h)])

    @T.macro
    def body(x, values, indices, scales, y):
        for jb in T.parallel(nb) if parallel else T.serial(nb):
            for b in range(x.shape[0]):
                acc = T.decl_buffer((halves,), vt, scope="local")  # per thread: registers, never shared
                for h in T.unroll(halves):
                    acc[h] = T.Broadcast(T.float32(0), lanes)
                if four_bit:
                    for g2 in range(pairs):
                        for s in range(n):
                            for h in T.unroll(halves):
                                byte = T.Cast(it, indices[jb, g2, s, lane(h)])
                                for p in T.unroll(2):
                                    xv = gather(T.address_of(x[b, 0]), nib(byte, p) + col(g2 * 2 + p))
                                    acc[h] = acc[h] + weight(values, jb, g2 * 2 + p, s, h) * xv
                    if odd:
                        for s in range(n):
                            for h in T.unroll(halves):
                                byte = T.Cast(it, indices[jb, pairs, s, lane(h)])
                                xv = gather(T.address_of(x[b, 0]), nib(byte, 0) + col(g_all - 1))
                                acc[h] = acc[h] + weight(values, jb, g_all - 1, s, h) * xv
                else:
                    for g in range(g_all):
                        for s in range(n):
                            for h in T.unroll(halves):
                                pos = T.Cast(it, indices[jb, g, s, lane(h)])
                                xv = gather(T.address_of(x[b, 0]), pos + col(g))
                                acc[h] = acc[h] + weight(values, jb, g, s, h) * xv
                if int8:  # the row scales, once per output instead of once per weight
                    for h in T.unroll(halves):
                        acc[h] = acc[h] * scales[T.Ramp(jb * BLOCK + h * lanes, 1, lanes)]
                if rem == 0:
                    for h in T.unroll(halves):
                        y[b, T.Ramp(jb * BLOCK + h * lanes, 1, lanes)] = acc[h]
                else:
                    if jb < full:
                        for h in T.unroll(halves):
                            y[b, T.Ramp(jb * BLOCK + h * lanes, 1, lanes)] = acc[h]
                    else:  # the padded last block: only its first rem rows exist
                        tmp = T.decl_buffer((BLOCK,), "float32", scope="local")
                        for h in T.unroll(halves):
                            tmp[lane(h)] = acc[h]
                        for r in range(rem):
                            y[b, jb * BLOCK + r] = tmp[r]

    if int8:
        return _int8_entry(body, k, n_out, n, m, nb, g_all, gi_rows)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, v_h: T.handle, i_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(x_h, (batch, k), "float32")
        values = T.match_buffer(v_h, (nb, g_all, n, BLOCK), "float32")
        indices = T.match_buffer(i_h, (nb, gi_rows, n, BLOCK), "uint8")
        y = T.match_buffer(y_h, (batch, n_out), "float32")
        body(x, values, indices, values, y)

    return kernel


def _int8_entry(body, k, n_out, n, m, nb, g_all, gi_rows):
    """The int8-values entry of :func:`_gather_kernel` (a separate function: TVMScript parses every prim_func it
    meets, and the fp32 one has no scales buffer for the macro's int8 branch)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def kernel_int8(x_h: T.handle, v_h: T.handle, i_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        x = T.match_buffer(x_h, (batch, k), "float32")
        values = T.match_buffer(v_h, (nb, g_all, n, BLOCK), "int8")
        indices = T.match_buffer(i_h, (nb, gi_rows, n, BLOCK), "uint8")
        scales = T.match_buffer(s_h, (nb * BLOCK,), "float32")
        y = T.match_buffer(y_h, (batch, n_out), "float32")
        body(x, values, indices, scales, y)

    return kernel_int8


def sparse_matmul_func(batch, k: int, n_out: int, n: int, m: int, dtype: str, target,
                       int8: bool = False, out_dtype: str | None = None) -> tirx.PrimFunc:
    """The scheduled kernel for ``target`` (llvm or a GPU kind); marked ``tirx.is_scheduled``. On a GPU target it
    reads :func:`.pack.pack_gpu`'s layout, elsewhere :func:`.pack.pack`'s (:func:`pack_for` picks).

    ``batch``: an int, or a ``tirx.Var("batch", "int64")`` for a model compiled with a dynamic batch (the x86
    gather kernel is always shape-generic in the batch).
    int8: the values are int8 codes with an fp32 scale per row (:func:`.pack.pack_int8`); the kernel takes
    ``(x, values, indices, scales, y)``. CPU targets only.
    out_dtype: GPU targets may write an fp32 output from fp16 inputs (``precision="fp16"``'s matmuls)."""
    kind = target.kind.name if target is not None else "llvm"
    if int8 and (kind != "llvm" or dtype != "float32"):
        raise ConfigError(f"N:M sparsity with int8 values is implemented for CPU (llvm) targets with fp32 "
                          f"activations, not {kind}/{dtype}: compile without quantization, or for a CPU")
    if is_gpu(target):
        from .gpu_kernel import gpu_kernel

        # (the GPU kernel is shape-generic in the batch, like the x86 one)
        max_threads = int(target.attrs.get("max_num_threads", 256))
        return gpu_kernel(k, n_out, n, m, dtype, vector_loads=kind != "metal", max_threads=max_threads,
                          out_dtype=out_dtype)
    if out_dtype not in (None, dtype):
        raise ConfigError(f"sparse matmul: an output dtype ({out_dtype}) other than the input's ({dtype}) is "
                          "implemented for GPU targets only")
    isa = gather_isa(target, dtype) if kind == "llvm" else None
    if isa is not None:
        from ...schedules.cpu.common import num_cores

        return _gather_kernel(k, n_out, n, m, isa, parallel=num_cores(target) > 1, int8=int8)
    func = _prim_func(batch, k, n_out, n, m, dtype, int8)
    if kind == "llvm":
        func = schedule_cpu(func, target, n_out, k, m, dtype)
    else:
        # no rule of ours for this kind (not a CPU, not a GPU): the pipeline's generic rules get the TE form
        return func
    return func.with_attr("tirx.is_scheduled", True)
