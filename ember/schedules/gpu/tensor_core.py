"""fp16 GEMMs on NVIDIA tensor cores (sm_70 and newer): shared-memory tiling plus WMMA fragments.

Why ember has its own: dlight's ``Matmul`` rule reaches its tensor-core schedule only when
``check_sm_version(arch) >= 70``, and that check reads ``sm_90a`` (the arch ember uses for Hopper) as -1; so on an
H100 every matmul fell back to the CUDA-core schedule (26 TFLOP/s at 4096^3 against cuBLAS's 760). And its
tensor-core schedule has one fixed tile (128x128 per block): a MiniLM layer at batch 1 (128 tokens x 384) then
makes 3 blocks for a 132-SM GPU.

The schedule (one thread block computes a ``BM x BN`` tile of C; each of its warps a ``FM*16 x FN*16`` piece):

    for each block tile (blockIdx.y, blockIdx.x)         # BM = WM * FM * 16, BN = WN * FN * 16
      for ko in K / BK:                                  # software-pipelined: next tile loads while this computes
        A[BM, BK], B[BN, BK] -> shared (16-byte vector loads, rows padded against bank conflicts)
        for ki in BK / 16:                               # per warp (threadIdx.y = warp id)
          FM fragments of A, FN of B -> registers (wmma::load_matrix_sync)
          FM x FN wmma::mma_sync into accumulators (fp32 or fp16, as the kernel asks)
      accumulators -> shared -> C (vector stores; epilogue ops such as bias/cast/GELU fused here)

The kernel is first normalised to ``C[s, i, j] += A[s, i, k] * B[s, j, k]`` (dlight's ``get_index_map``); the
layout changes become copies that are inlined into the shared-memory loads, so ``W[K, N]`` and ``W[N, K]`` both
work, and M may be symbolic (padded to the tile). ``TileConfig`` is chosen from the problem size so that large
GEMMs get large tiles (more reuse per byte loaded) and small ones enough blocks to fill the GPU.

W [K, N] (how ember stores linear weights) keeps a K-major shared tile, read with 16-byte loads and fed to WMMA's
row-major B fragments. Small GEMMs with a long K (MiniLM batch 1's FFN down-projection, 128x384x1536: 24 tiles)
are split along K: the tensor-core kernel writes fp32 partial sums per K slice and a second kernel adds them and
runs the epilogue (on the H100 the model went from 0.312 to 0.284 ms; BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from .common import analyze_matmul, is_cuda, sm_version, tensor_intrinsics_registered

MIN_EXTENT = 64
FRAG = 16  # WMMA m16n16k16
WARP = 32
SMS = 132  # H100 SXM; only used to prefer tiles that give every SM work


@dataclass(frozen=True)
class TileConfig:
    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 4
    frags_n: int = 4
    k_frags: int = 2  # BK = 32
    vector: int = 8  # fp16 per 16-byte load
    pipeline: bool = True
    split_k: int = 1  # > 1: K cut into this many slices, one block each; a second kernel sums the fp32 slices

    def with_split(self, split_k: int) -> "TileConfig":
        return TileConfig(self.warps_m, self.warps_n, self.frags_m, self.frags_n, self.k_frags, self.vector,
                          self.pipeline, split_k)

    @property
    def bm(self) -> int:
        return self.warps_m * self.frags_m * FRAG

    @property
    def bn(self) -> int:
        return self.warps_n * self.frags_n * FRAG

    @property
    def bk(self) -> int:
        return self.k_frags * FRAG

    @property
    def threads(self) -> int:
        return self.warps_m * self.warps_n * WARP


CONFIGS = {
    "large": TileConfig(warps_m=2, warps_n=4, frags_m=4, frags_n=4, k_frags=2),   # 128 x 256
    "medium": TileConfig(warps_m=2, warps_n=2, frags_m=4, frags_n=4, k_frags=2),  # 128 x 128
    "small": TileConfig(warps_m=2, warps_n=2, frags_m=2, frags_n=2, k_frags=2),   # 64 x 64
    "tiny": TileConfig(warps_m=2, warps_n=2, frags_m=1, frags_n=2, k_frags=4),    # 32 x 64
    "micro": TileConfig(warps_m=2, warps_n=1, frags_m=1, frags_n=2, k_frags=4),   # 32 x 32, 2 warps
    "wide": TileConfig(warps_m=2, warps_n=2, frags_m=4, frags_n=2, k_frags=2),    # 128 x 64
}

# Split-K only pays where one block would otherwise walk a long K alone: the MiniLM FFN down-projection
# (M=128, N=384, K=1536) ran at 8 TFLOP/s on the H100 with 24 blocks of 32x64 (BENCHMARKS.md, "Fusion on an H100").
# Below this K the second (summing) kernel costs about what the extra blocks win.
SPLIT_K_MIN_K = 1024
SPLIT_K_MIN_STEPS = 4  # K tiles per slice: fewer leaves the software pipeline nothing to overlap


def split_k_for(blocks: int, k: int, cfg: TileConfig) -> int:
    """How many K slices bring ``blocks`` tiles close to one wave of SMs (1: no split)."""
    if k < SPLIT_K_MIN_K or blocks * 2 > SMS:
        return 1
    steps = -(-k // cfg.bk)
    best = 1
    for s in range(2, steps // SPLIT_K_MIN_STEPS + 1):
        if steps % s == 0 and blocks * s <= SMS:
            best = s
    return best


def choose_config(m: int | None, n: int, k: int) -> TileConfig:
    """The largest tile that still gives ~one block per SM (M symbolic: assume large); small problems get
    32x64 tiles and, where K is long, split-K (``split_k_for``).

    "large" (128x256) is not tried: on the H100 "medium" (128x128) was faster at 4096^3 (276 vs 265 TFLOP/s,
    benchmarks/results/gpu_bench_kernels_h100_2026-11-26_rerun.json); it stays in CONFIGS for benchmarking.
    "medium" needs a full wave of blocks. Alone, at 4096x384 (96 blocks, 3/4 of a wave) it beat 64x64 tiles (384
    blocks) on the H100 (10.4 vs 11.0 us at K=384, 27.5 vs 31.5 us at K=1536,
    gpu_bench_h100_2026-11-26_h6_run2_kernels.json), but inside MiniLM fp16 batch 32 the model got slower with it:
    1.195 ms vs 1.075-1.079 ms with 64x64 (gpu_bench_h100_2026-11-26_final_models.json vs ..._h6_run{1,2}_b32.json)."""
    for name, fill in (("medium", 1.0), ("small", 1.0)):
        cfg = CONFIGS[name]
        if m is None:
            return CONFIGS["medium"]
        blocks = -(-m // cfg.bm) * -(-n // cfg.bn)
        if blocks >= fill * SMS:
            return cfg
    cfg = CONFIGS["tiny"]
    blocks = -(-m // cfg.bm) * -(-n // cfg.bn)
    return cfg.with_split(split_k_for(blocks, k, cfg))


class TensorCoreMatmul:
    """fp16 matmul on tensor cores for CUDA sm_70+ (see module doc). ``config``: force one tile config."""

    def __init__(self, config: TileConfig | None = None):
        self.config = config

    def __repr__(self) -> str:
        return f"ember.TensorCoreMatmul({self.config or 'auto'})"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool = False) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not is_cuda(target) or sm_version(target) < 70:
            return None
        if "dlight.do_not_tensorize" in (func.attrs or {}):
            return None
        probe = s_tir.Schedule(func)
        mm = analyze_matmul(probe)
        if mm is None:
            return None
        if mm.act_dtype != "float16" or mm.weight_dtype != "float16" or mm.out_dtype not in ("float16",
                                                                                            "float32"):
            return None
        if mm.n is None or mm.k is None or mm.n <= MIN_EXTENT or mm.k <= MIN_EXTENT:
            return None
        if mm.batch is not None and mm.batch <= MIN_EXTENT:
            return None
        # The block's first read must be k-contiguous (A[i, k]); the second may be either way round.
        stmt = probe.get(mm.block)
        last = [r.region[-1].min for r in stmt.reads[:2]]
        k_var = mm.k_iter.var
        if not (isinstance(last[0], tirx.Var) and last[0].same_as(k_var)):
            return None
        b_k_major = isinstance(last[1], tirx.Var) and last[1].same_as(k_var)
        cfg = self.config or choose_config(mm.batch, mm.n, mm.k)
        if cfg.split_k > 1 and mm.out_dtype != "float32" and self.config is None:
            # The slices' partial sums have the accumulator's dtype: in fp16 they would add a rounding per slice.
            cfg = cfg.with_split(1)
        tensor_intrinsics_registered()
        try:
            return _schedule(func, cfg, mm.out_dtype, trans_b=b_k_major)
        except Exception:  # pylint: disable=broad-except
            # A kernel the tensorizer cannot express (odd epilogues, layouts): the next rule takes it.
            return None


def _schedule(func: tirx.PrimFunc, cfg: TileConfig, out_dtype: str, trans_b: bool = True) -> s_tir.Schedule | None:
    """``trans_b``: B is stored [N, K] (K contiguous) and its shared tile is [BN, BK]. Else B is stored [K, N]
    (how ember keeps linear weights: the transpose is lifted to compile time) and the shared tile stays K-major,
    [BK, BN], so that both operands load with 16-byte vectors and the fragments use WMMA's row-major B.
    ``cfg.split_k > 1``: the K loop is cut into that many slices (``rfactor``), each slice is a block of the
    tensor-core kernel writing fp32 partial sums, and a second kernel adds the slices and runs the epilogue."""
    from tvm.s_tir.dlight.analysis import get_root_block  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.dlight.gpu.matmul import (  # pylint: disable=import-outside-toplevel
        auto_inline_consumer_chain, auto_inline_producers, get_index_map, get_reduction_blocks)
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group  # pylint: disable=import-outside-toplevel

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if reductions is None or len(reductions) != 1:
        return None
    main = reductions[0]
    maps = get_index_map(sch.get(main))
    if maps is None:
        return None
    # 1. Normalise to C[s, i, j] += A[s, i, k] * B[s, j, k]; the layout copies are inlined further down.
    ra = sch.reindex(main, ("read", 0))
    rb = sch.reindex(main, ("read", 1))
    rc = sch.reindex(main, ("write", 0))
    block_map, a_map, b_map, c_map = maps
    sch.transform_layout(ra, ("write", 0), a_map)
    sch.transform_layout(rb, ("write", 0), b_map)
    if not trans_b:  # keep B K-major: [s, j, k] -> [s, k, j]
        sch.transform_layout(rb, ("write", 0), lambda s_, j_, k_: (s_, k_, j_))
    sch.transform_layout(rc, ("read", 0), c_map)
    sch.transform_block_layout(main, block_map)
    sch.pad_einsum(main, [1, cfg.bm, cfg.bn, cfg.bk])

    writeback = None
    if cfg.split_k > 1:
        # Split-K: C_rf[ks, s, i, j] = sum over slice ks of A * B (fp32), then C = sum_ks C_rf (second kernel).
        batch, i, j, k = sch.get_loops(main)
        ks, k = sch.split(k, [cfg.split_k, None])
        sch.reorder(ks, batch, i, j, k)
        rf = sch.rfactor(ks, factor_axis=0)
        writeback, main = main, rf
        ks, batch, i, j, k = sch.get_loops(main)
        batch = sch.fuse(ks, batch)
    else:
        batch, i, j, k = sch.get_loops(main)

    # 2. 16x16x16 tensor-core tiles, then block / warp / fragment levels.
    i, ii = sch.split(i, [None, FRAG])
    j, jj = sch.split(j, [None, FRAG])
    k, kk = sch.split(k, [None, FRAG])
    sch.reorder(i, j, k, ii, jj, kk)
    inner = main
    outer = sch.blockize(ii)
    bi, wi, fi = sch.split(i, [None, cfg.warps_m, cfg.frags_m])
    bj, wj, fj = sch.split(j, [None, cfg.warps_n, cfg.frags_n])
    ko, ki = sch.split(k, [None, cfg.k_frags])
    sch.reorder(bi, bj, wi, wj, ko, ki, fi, fj)
    sch.bind(batch, "blockIdx.z")
    sch.bind(bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    warp = sch.fuse(wi, wj)
    sch.bind(warp, "threadIdx.y")
    n_warps = cfg.warps_m * cfg.warps_n

    # 3. Operand tiles to shared memory: all threads, 16-byte vectors, rows padded by 8 halves (bank conflicts).
    def to_shared(idx):
        cache = sch.cache_read(outer, idx, "shared.dyn")
        sch.compute_at(cache, ko)
        rows, cols = sch.get_loops(cache)[-2:]
        vector = cfg.vector  # both tiles are contiguous along their last axis (K for A, K or N for B)
        fused = sch.fuse(rows, cols)
        _, ty, tx, vec = sch.split(fused, [None, n_warps, WARP, vector])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        sch.storage_align(cache, 0, axis=-2, factor=16, offset=8)
        if cfg.pipeline:
            sch.annotate(cache, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(cache, "double_buffer_scope", 0)
        return cache

    a_s = to_shared(0)
    b_s = to_shared(1)
    auto_inline_producers(sch, a_s)
    auto_inline_producers(sch, b_s)

    # 4. Fragments, accumulators, and the way out through shared memory (where the epilogue is fused).
    a_f = sch.cache_read(outer, 0, "wmma.matrix_a")
    b_f = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(a_f, ki)
    sch.compute_at(b_f, ki)
    # The C tile goes out through static shared memory when static + dynamic shared memory stay within the 48 KiB a
    # kernel gets without opting in (beyond that the launch fails: CUDA_ERROR_INVALID_VALUE, measured on the H100).
    # Why not always dynamic: there TVM 0.27 may place a small fp32 C tile over the (dead by then) fp16 operand
    # tiles and then refuses the mixed-type pointer ("tvm_access_ptr element type must match the source buffer").
    # Tiles too big for the static budget are bigger than the operand tiles, which avoids that overlap.
    out_bytes = 4 if out_dtype == "float32" else 2
    c_bytes = cfg.bm * (cfg.bn + 4) * out_bytes
    operand_bytes = (cfg.bm + cfg.bn) * (cfg.bk + 8) * 2 * (2 if cfg.pipeline else 1)
    c_scope = "shared" if c_bytes + operand_bytes <= 48 * 1024 else "shared.dyn"
    c_s = sch.cache_write(outer, 0, c_scope)
    sch.storage_align(c_s, 0, -2, 16, 4)
    c_f = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(c_f, warp)
    sch.reverse_compute_at(c_s, warp)
    ci, cj = sch.get_loops(c_f)[-2:]
    ci0, ci1 = sch.split(ci, [None, FRAG])
    cj0, cj1 = sch.split(cj, [None, FRAG])
    sch.reorder(ci0, cj0, ci1, cj1)
    init = sch.decompose_reduction(outer, ko)
    init_inner = sch.get_child_blocks(init)[0]

    group = get_wmma_intrin_group(load_scope="shared.dyn", store_scope=c_scope, in_dtype="float16",
                                  out_dtype=out_dtype, trans_b=trans_b)  # shared B: [N, K] if trans_b
    for frag, intrin in ((a_f, group["load_a"]), (b_f, group["load_b"])):
        fi_, fj_ = sch.get_loops(frag)[-2:]
        f0, f1 = sch.split(fi_, [None, FRAG])
        g0, g1 = sch.split(fj_, [None, FRAG])
        sch.reorder(f0, g0, f1, g1)
        sch.unroll(f0)
        sch.unroll(g0)
        sch.tensorize(f1, intrin)
    sch.tensorize(sch.get_loops(init_inner)[-2], group["init"])
    sch.tensorize(sch.get_loops(c_f)[-2], group["store"])
    sch.tensorize(sch.get_loops(inner)[-3], group["compute"])

    if writeback is None:
        auto_inline_consumer_chain(sch, c_s)
    fused = sch.fuse(*sch.get_loops(c_s)[-2:])
    _, tx, vec = sch.split(fused, [None, WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    if writeback is not None:
        _schedule_writeback(sch, writeback)

    if cfg.pipeline:
        # Statements under ko: A and B tiles (each global->registers, registers->shared), then the ki loop.
        sch.annotate(ko, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(ko, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(ki, "software_pipeline_stage", [0, 0, 1])
        sch.annotate(ki, "software_pipeline_order", [0, 1, 2])
    return sch


def _schedule_writeback(sch: s_tir.Schedule, writeback) -> None:
    """Split-K's second kernel: one thread per output element adds the K slices (fp32) and runs the epilogue
    (the reindex copy, casts, bias...) on its element. The sum cannot absorb the epilogue blocks by inlining (they
    read a reduction's result), so they are computed under the same thread loop; their intermediate buffers lie
    inside this one kernel and live in registers."""
    # rfactor gives the write-back its own loop nest, the slice loop outermost: move it inside.
    ks, *spatial = sch.get_loops(writeback)
    sch.reorder(*spatial, ks)
    fused = sch.fuse(*spatial)
    bx, tx = sch.split(fused, [None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    # Each thread's sum and the epilogue's intermediates stay in registers ("local"); the chain's last block
    # writes the function's output.
    block = writeback
    consumers = sch.get_consumers(block)
    while len(consumers) == 1:
        sch.set_scope(block, 0, "local")
        block = consumers[0]
        sch.reverse_compute_at(block, tx)
        consumers = sch.get_consumers(block)
