"""fp16 GEMMs on Hopper's warpgroup tensor cores (``wgmma``, sm_90a), fed by the TMA copy engine.

Why: the WMMA rule (:mod:`.tensor_core`) issues legacy ``mma.sync`` through register fragments, which tops out
near 37% of cuBLAS on an H100 (BENCHMARKS.md, "GEMM 4096³"). Hopper's fast path is ``wgmma.mma_async``: a
warpgroup (4 warps) multiplies a 64 x N x 16 tile whose operands the tensor cores read straight from shared
memory through 64-bit matrix descriptors, while the Tensor Memory Accelerator copies the next tiles in.

The kernel (one thread block per ``BM x BN`` tile of C, ``BM = 64 * consumers``)::

    warpgroup 0 (producer; one elected thread)        warpgroups 1..consumers (each 64 rows of the tile)
    for kt in K / 64:                                 acc[64 x BN] = 0 (fp32, registers)
      s = kt % STAGES                                 for kt in K / 64:
      wait empty[s] (stage free again)                  wait full[s]
      TMA A[m0:m0+BM, kt*64:+64]   -> smem A[s]         4 x wgmma m64n{BN}k16 (A, B from smem descriptors)
      TMA B tile (see layouts)     -> smem B[s]         commit; wait for the group; arrive empty[s]
      (both complete on full[s]: expect-tx bytes)     epilogue: acc -> (cast, fused ops) -> C, from the
                                                        accumulator fragment (row g / g+8, 2 columns), or staged
                                                        through shared memory for 16-byte row stores

Shared tiles use the 128-byte swizzle that TMA writes and the wgmma descriptors read (rows of 64 halves). Layouts:

* A ``[M, K]`` row-major: K-major tiles ``[BM][64]``.
* W ``[N, K]`` ("nt", nn.Linear's layout): K-major ``[BN][64]``, like A (``trans-b = 0``).
* W ``[K, N]`` ("nn", how ember stores linear weights): the tile stays N-major: ``BN / 64`` TMA boxes of
  ``[64 K rows][64 N]`` side by side; the descriptor walks N in 64-wide swizzle atoms (``trans-b = 1``).

TMA zero-fills reads outside the tensor, so M, N and K need not divide the tile (stores are guarded); the
tensor maps need 16-byte row strides (K and, for "nn", N multiples of 8).

Registers: a consumer holds ``BN / 2`` fp32 accumulators; the producer gives registers back (``setmaxnreg``).
Persistent variant (``HopperConfig.persistent``): a grid of one block per SM, each walking tiles ``b, b + grid,
...``; the k-step counter runs on across tiles, so the producer fills the next tile's stages during this tile's
epilogue. Staged epilogue (``HopperConfig.staged``, fp16 outputs, chosen for K <= 2048): see :func:`_epilogue`.

The rule (:class:`HopperGemm`) replaces a whole fused kernel: the matmul block plus whatever elementwise chain
FuseTIR left after it (cast, bias add, GELU, a reshape of the rows) becomes one TVMScript statement evaluated at the
store (:func:`plan_kernel`); an fp32 erf in it is replaced by a vectorizable polynomial (:func:`erf_f32_lets`).
H100, 2026-11-26 (BENCHMARKS.md, "Hopper fp16 GEMM on wgmma + TMA"): fp16 GEMM 4096^3 at 653-658 TFLOP/s, 87-88% of
cuBLAS (W [K, N]: 77-79%); the WMMA rule made 276. MiniLM b32's GEMMs ("FFN-up + GELU and the small GEMMs"): FFN-up
+ erf-GELU 35 -> 18 us, Q/K/V/O 8.6 -> 5.6-7.4 us, FFN-down 14.2 -> 11.2-11.8 us with the staged epilogue, the
vectorized erf and 64x192 tiles (``EMBER_HOPPER_LEGACY=1`` compiles the rule as before them).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import tvm

BK = 64  # one 128-byte swizzle row of fp16
WGMMA_K = 16


@dataclass(frozen=True)
class HopperConfig:
    consumers: int = 2  # consumer warpgroups; BM = 64 * consumers
    bn: int = 256
    stages: int = 4
    raise_regs: bool = True  # setmaxnreg: producer down to 40, consumers up to 232 (H100: 632 vs 603 TFLOP/s)
    persistent: bool = False  # one block per SM walking tiles: the next tile's loads overlap this one's epilogue
    staged: bool = False  # epilogue through shared memory, then 16-byte row-contiguous stores (fp16 outputs)

    @property
    def bm(self) -> int:
        return 64 * self.consumers

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)

    @property
    def stage_pitch(self) -> int:
        """Row pitch (halves) of the staged epilogue's tile: 8 halves of padding put the 8 rows that one warp's
        half2 store writes in 8 different 4-bank groups (row stride = 4 words mod 32): conflict-free."""
        return self.bn + 8

    def smem_bytes(self) -> int:
        ring = self.stages * (self.bm + self.bn) * BK * 2
        return ring + (self.bm * self.stage_pitch * 2 if self.staged else 0)

    def fits(self) -> bool:
        return self.smem_bytes() + 1024 <= SMEM_LIMIT  # + the barriers' static block, rounded up to 1 KiB


SMEM_LIMIT = 227 * 1024  # H100 opt-in dynamic shared memory per block
SMS = 132  # H100 SXM: a persistent kernel's grid


def _tensor_map(name: str, buf: str, inner: int, outer: int, box_inner: int, box_outer: int) -> str:
    """Host code: a 2-D tensor map (fp16, 128-byte swizzle, zero fill out of bounds) over ``buf``."""
    return (f"    {name}: T.let[T.handle(\"tensormap\")] = T.tvm_stack_alloca(\"tensormap\", 1)\n"
            f"    T.call_packed(\"runtime.cuTensorMapEncodeTiled\", {name}, \"float16\", 2, {buf}.data, {inner}, "
            f"{outer}, {inner * 2}, {box_inner}, {box_outer}, 1, 1, 0, 3, 2, 0)\n")


def wgmma_gemm(m: int, n: int, k: int, layout: str, out_dtype: str = "float16",
               cfg: HopperConfig = HopperConfig()) -> tvm.tirx.PrimFunc:
    """``C[m, n] = sum_k A[m, k] * W`` with W ``[n, k]`` (layout "nt") or ``[k, n]`` ("nn"); fp32 accumulation,
    C in ``out_dtype`` (float16 or float32). See the module doc."""
    w_shape = f"({n}, {k})" if layout == "nt" else f"({k}, {n})"
    sig = (f"A: T.Buffer(({m}, {k}), \"float16\"), B: T.Buffer({w_shape}, \"float16\"), "
           f"C: T.Buffer(({m}, {n}), \"{out_dtype}\")")
    return _parse(_source(m, n, k, layout, cfg, signature=sig, a_name="A", b_name="B",
                          reads=f"A[0:{m}, 0:{k}], B[0:{w_shape[1:-1].replace(', ', ', 0:')}]",
                          writes=f"C[0:{m}, 0:{n}]", store=f"C[EPR, EPC] = T.Cast(\"{out_dtype}\", EPV)"))


def _source(m: int, n: int, k: int, layout: str, cfg: HopperConfig, *, signature: str, a_name: str, b_name: str,
            reads: str, writes: str, store: str, acc_cast: str | None = None, fast_erf: bool = True) -> str:
    """TVMScript of the kernel. ``store``: one statement that writes output element (EPR, EPC) from the fp32
    accumulator value EPV (the epilogue; names replaced here); ``acc_cast``: dtype the accumulator is rounded to
    before the epilogue sees it (a kernel whose own reduction is fp16)."""
    if layout not in ("nt", "nn"):
        raise ValueError(f"layout {layout!r}: 'nt' (W[N, K]) or 'nn' (W[K, N])")
    bm, bn, S, W = cfg.bm, cfg.bn, cfg.stages, cfg.consumers
    if bn % 64 or not 64 <= bn <= 256:
        raise ValueError(f"bn={bn}: a multiple of 64 up to 256")
    if not cfg.fits():
        raise ValueError(f"{cfg}: {cfg.smem_bytes()} bytes of stages exceed the {SMEM_LIMIT} a block may use")
    kt = -(-k // BK)
    tm, tn = -(-m // bm), -(-n // bn)
    a_elems, b_elems = bm * BK, bn * BK
    b_base = S * a_elems
    stage_bytes = (a_elems + b_elems) * 2
    tma = "T.ptx[\"cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes\"]"
    host = _tensor_map("A_map", a_name, k, m, BK, bm)
    if layout == "nt":
        host += _tensor_map("B_map", b_name, k, n, BK, bn)
        b_loads = (f"{tma}({_dst(f'{b_base} + s * {b_elems}', b_elems)}, T.address_of(B_map), kt * {BK}, n0, "
                   f"T.address_of(bars[s]))")
        # K-major, 128B swizzle: 8-row core groups 1024 bytes apart (SBO); LBO unused (1); +32 bytes per k16.
        b_desc = f"T.address_of(smem[{b_base} + s * {b_elems} + kk * {WGMMA_K}]), 1, 64, 3"
        trans_b = 0
    else:
        host += _tensor_map("B_map", b_name, n, k, 64, BK)
        b_loads = "\n".join(
            f"{tma}({_dst(f'{b_base} + s * {b_elems} + {j * 64 * BK}', 64 * BK)}, T.address_of(B_map), "
            f"n0 + {j * 64}, kt * {BK}, T.address_of(bars[s]))" for j in range(bn // 64))
        # N-major, 128B swizzle: atoms of 64 N x 8 K rows (1024 bytes). The leading byte offset is the step
        # between 64-wide N atoms (one TMA box, 64 * BK halves), the stride byte offset the step between 8-row K
        # groups (1024 bytes); both in 16-byte units. (The swapped reading was measured wrong on the H100.)
        lbo, sbo = 64 * BK * 2 // 16, 1024 // 16
        b_desc = f"T.address_of(smem[{b_base} + s * {b_elems} + kk * {WGMMA_K * 64}]), {lbo}, {sbo}, 3"
        trans_b = 1
    a_desc = f"T.address_of(smem[s * {a_elems} + wg * {64 * BK} + kk * {WGMMA_K}]), 1, 64, 3"
    acc_n = bn // 2
    accs = ", ".join(f"acc[{i}]" for i in range(acc_n))
    mma = f"wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.f16.f16"
    epilogue = _indent(_epilogue(store, cfg, m, n, acc_cast, fast_erf=fast_erf), 28)
    ring = S * (a_elems + b_elems)
    smem_elems = ring + (bm * cfg.stage_pitch if cfg.staged else 0)
    # The staging tile is reached through a generic pointer: TVM's ThreadSync pass would otherwise plan a
    # block-wide barrier between its writes and reads inside the consumer branch (and refuse); the ordering is
    # the named warpgroup barrier of the epilogue instead.
    stage_decl = (f"stage_ptr: T.let[T.handle(\"float16\", \"global\")] = "
                  f"T.reinterpret(T.handle(\"float16\", \"global\").ty, "
                  f"T.address_of(smem[{ring} + wg * {64 * cfg.stage_pitch}]))\n"
                  f"                    stage = T.decl_buffer(({64 * cfg.stage_pitch},), \"float16\", data=stage_ptr)"
                  if cfg.staged else "T.evaluate(0)")
    setreg_p = "T.ptx[\"setmaxnreg.dec.sync.aligned.u32\"](40)" if cfg.raise_regs else "T.evaluate(0)"
    setreg_c = "T.ptx[\"setmaxnreg.inc.sync.aligned.u32\"](232)" if cfg.raise_regs else "T.evaluate(0)"
    # Drain this k-tile's wgmma group, then hand its stage back to the producer. (Keeping one group in flight and
    # releasing the previous stage instead was slower on the H100, 606 vs 632 TFLOP/s at 4096^3.)
    release = (f"T.ptx.wgmma.wait_group.sync.aligned(0)\n"
               f"                                if tx % 128 == 0:\n"
               f"                                    T.ptx.mbarrier.arrive.shared.b64(T.address_of(bars[{S} + s]))")
    # Tiles: one per block, or (persistent) block b takes tiles b, b + grid, ...; the k-step counter g runs on across
    # a block's tiles, so the stage ring and its barrier phases simply continue.
    total = tm * tn
    grid = min(total, SMS) if cfg.persistent else total
    per_block = -(-total // grid)
    live = f"bid + t * {grid} < {total}" if grid * per_block != total else "True"
    src = f"""
@T.prim_func(s_tir=True)
def main({signature}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{host}    for bid in T.thread_binding({grid}, thread="blockIdx.x"):
        for tx in T.thread_binding({cfg.threads}, thread="threadIdx.x"):
            with T.sblock("wgmma_gemm"):
                T.reads({reads})
                T.writes({writes})
                smem = T.alloc_buffer(({smem_elems},), "float16", scope="shared.dyn", align=1024)
                bars = T.alloc_buffer(({2 * S},), "uint64", scope="shared", align=8)
                acc = T.alloc_buffer(({acc_n},), "float32", scope="local")
                desc_a = T.alloc_buffer((1,), "uint64", scope="local")
                desc_b = T.alloc_buffer((1,), "uint64", scope="local")
                if tx == 0:
                    for s in T.unroll({S}):
                        T.ptx.mbarrier.init.shared.b64(T.address_of(bars[s]), T.uint32(1))
                        T.ptx.mbarrier.init.shared.b64(T.address_of(bars[{S} + s]), T.uint32({W}))
                    T.ptx.fence.mbarrier_init.release.cluster()
                T.tvm_storage_sync("shared")
                if tx < 128:
                    {setreg_p}
                    if tx == 0:
                        for t in range({per_block}):
                            if {live}:
                                m0 = T.meta_var((bid + t * {grid}) % {tm} * {bm})
                                n0 = T.meta_var((bid + t * {grid}) // {tm} * {bn})
                                for kt in range({kt}):
                                    s = T.meta_var((t * {kt} + kt) % {S})
                                    if t * {kt} + kt >= {S}:
                                        T.cuda.mbarrier_wait(T.address_of(bars[{S} + s]), ((t * {kt} + kt) // {S} + 1) % 2)
                                    T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bars[s]), T.uint32({stage_bytes}))
                                    {tma}({_dst(f's * {a_elems}', a_elems)}, T.address_of(A_map), kt * {BK}, m0, T.address_of(bars[s]))
                                    {_indent(b_loads, 36)}
                else:
                    {setreg_c}
                    wg = T.meta_var(tx // 128 - 1)
                    {stage_decl}
                    for t in range({per_block}):
                        if {live}:
                            m0 = T.meta_var((bid + t * {grid}) % {tm} * {bm})
                            n0 = T.meta_var((bid + t * {grid}) // {tm} * {bn})
                            for i in T.unroll({acc_n}):
                                acc[i] = T.float32(0)
                            for kt in range({kt}):
                                s = T.meta_var((t * {kt} + kt) % {S})
                                T.cuda.mbarrier_wait(T.address_of(bars[s]), (t * {kt} + kt) // {S} % 2)
                                T.ptx.wgmma.fence.sync.aligned()
                                for kk in T.unroll({BK // WGMMA_K}):
                                    T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a[0]), {a_desc})
                                    T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b[0]), {b_desc})
                                    T.ptx["{mma}"]({accs}, desc_a[0], desc_b[0], T.bool(True), 1, 1, 0, {trans_b})
                                T.ptx.wgmma.commit_group.sync.aligned()
                                {release}
                            {epilogue}
"""
    return src


def _epilogue(store: str, cfg: HopperConfig, m: int, n: int, acc_cast: str | None, fast_erf: bool = True) -> str:
    """TVMScript of a consumer warpgroup's epilogue for one tile (indent 0; ``store`` as in :func:`_source`).

    Accumulator fragment of m64nNk16 (PTX ISA): thread t of the warpgroup holds rows 16 * (t // 32) + t % 32 // 4
    (+ 8) and, for each 8-column group i, columns 8 i + 2 (t % 4) (+ 1): acc[4 i + 2 h + e].

    Direct: each element pair is computed and stored straight from the fragment (``T.vectorized(2)``: one 4-byte
    store for fp16; a warp's store touches 8 rows, 16 bytes each). Staged (``cfg.staged``, fp16 outputs): the pairs
    go to the warpgroup's padded tile in shared memory (``stage``); after a named warpgroup barrier each thread
    copies 16 contiguous bytes of a row to the output (a warp writes 512 bytes of whole rows), and a second barrier
    frees the tile for the next one. An fp32 erf in the statement becomes :func:`_erf_lets` (``fast_erf``): CUDA's
    ``erff`` call made TVM scalarize the pair loop (two 2-byte stores, MiniLM's FFN-up GELU)."""
    bm, bn = cfg.bm, cfg.bn
    frag_row = "(tx % 128 // 32 * 16 + tx % 32 // 4 + h * 8)"
    row = f"(m0 + wg * 64 + {frag_row})"
    col = f"(n0 + i * 8 + tx % 4 * 2)"
    guard = [f"{row} < {m}"] if m % bm else []
    guard += [f"{col} < {n}"] if n % bn else []
    val = "acc[i * 4 + h * 2 + e]"
    if acc_cast:
        val = f"T.Cast(\"{acc_cast}\", {val})"
    lhs, rhs = _split_store(store)
    lets, rhs = _erf_lets(rhs) if fast_erf else ([], rhs)

    def at(text, r, c, v=val):
        return text.replace("EPR", r).replace("EPC", c).replace("EPV", v)

    body = [at(ln, row, f"({col} + e)") for ln in lets]
    pitch = cfg.stage_pitch
    if cfg.staged:
        body.append(f"stage[{frag_row} * {pitch} + i * 8 + tx % 4 * 2 + e] = {at(rhs, row, f'({col} + e)')}")
    else:
        body.append(f"{at(lhs, row, f'({col} + e)')} = {at(rhs, row, f'({col} + e)')}")
    inner = ["for e in T.vectorized(2):"] + ["    " + ln for ln in body]
    if guard:
        inner = [f"if {' and '.join(guard)}:"] + ["    " + ln for ln in inner]
    lines = [f"for i in T.unroll({bn // 8}):", "    for h in T.unroll(2):"] + ["        " + ln for ln in inner]
    if not cfg.staged:
        return "\n".join(lines)
    chunks = bn // 8  # 16-byte chunks per tile row
    lin = "(j * 128 + tx % 128)"
    orow, ocol = f"(m0 + wg * 64 + {lin} // {chunks})", f"(n0 + {lin} % {chunks} * 8)"
    oguard = [f"{orow} < {m}"] if m % bm else []
    oguard += [f"{ocol} < {n}"] if n % bn else []
    copy = ["for e in T.vectorized(8):",
            f"    {at(lhs, orow, f'({ocol} + e)')} = stage[{lin} // {chunks} * {pitch} + {lin} % {chunks} * 8 + e]"]
    if oguard:
        copy = [f"if {' and '.join(oguard)}:"] + ["    " + ln for ln in copy]
    # Named barrier 1 + wg over the warpgroup's 128 threads, as PTX with a "memory" clobber (TVM's
    # T.cuda.warpgroup_sync has none: nvcc could move the staging tile's plain loads and stores across it).
    sync = "T.ptx[\"bar.sync\"](T.uint32(1) + T.Cast(\"uint32\", wg), T.uint32(128))"
    return "\n".join(lines + [sync, f"for j in T.unroll({64 * chunks // 128}):"]
                     + ["    " + ln for ln in copy] + [sync])


def _split_store(store: str) -> tuple[str, str]:
    """``OUT[idx] = value`` -> (``OUT[idx]``, ``value``): the first ``=`` outside brackets and parentheses."""
    depth = 0
    for i, ch in enumerate(store):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
        if depth == 0 and store.startswith(" = ", i):
            return store[:i], store[i + 3:]
    raise ValueError(f"not a store statement: {store[:80]}")


# erf(x) in fp32, branch-free, no division, one exp2 (the fit and its error: ember/schedules/erf_fit.py)
from ..erf_fit import ERF_BIG, ERF_CLAMP, ERF_SMALL, ERF_SPLIT  # noqa: E402  # pylint: disable=wrong-import-position


def _horner(coeffs, var: str) -> str:
    text = f"T.float32({coeffs[-1]!r})"
    for c in reversed(coeffs[:-1]):
        text = f"({text}) * {var} + T.float32({c!r})"
    return text


def erf_f32_lets(x: str, tag: str) -> tuple[list[str], str]:
    """TVMScript let-bindings computing erf of the float32 expression ``x`` (see ERF_SMALL), and the name of the
    result. Pure arithmetic plus one exp2, so a vectorized loop around it stays vectorized (CUDA's ``erff`` call
    made TVM scalarize the GELU epilogue: 2-byte stores)."""
    v = {k: f"ep_{k}{tag}" for k in "xascplr"}
    lets = [f"{v['x']}: T.let[T.float32] = {x}",
            f"{v['a']}: T.let[T.float32] = T.fabs({v['x']})",
            f"{v['s']}: T.let[T.float32] = {v['a']} * {v['a']}",
            f"{v['c']}: T.let[T.float32] = T.min({v['a']}, T.float32({ERF_CLAMP!r}))",
            f"{v['l']}: T.let[T.float32] = ({_horner(ERF_BIG, v['c'])}) * {v['c']} - {v['c']}",
            f"{v['p']}: T.let[T.float32] = T.Select({v['a']} >= T.float32({ERF_SPLIT!r}), "
            f"T.float32(1) - T.exp2({v['l']}), ({_horner(ERF_SMALL, v['s'])}) * {v['a']} + {v['a']})",
            # the sign by a select: T.copysign of a let variable breaks TVM's vectorizer (an undefined variable)
            f"{v['r']}: T.let[T.float32] = T.Select({v['x']} < T.float32(0), T.float32(0) - {v['p']}, {v['p']})"]
    return lets, v["r"]


def _erf_lets(rhs: str) -> tuple[list[str], str]:
    """Every ``T.erf(T.Cast("float32", ...))`` in the epilogue value replaced by :func:`erf_f32_lets` (one set of
    lets per distinct argument). An erf of another argument type is left alone."""
    lets, seen = [], {}
    start = 0
    while True:
        i = rhs.find("T.erf(", start)
        if i < 0:
            return lets, rhs
        depth, j = 0, i + len("T.erf")
        while j < len(rhs):
            depth += {"(": 1, ")": -1}.get(rhs[j], 0)
            if depth == 0:
                break
            j += 1
        arg = rhs[i + len("T.erf("):j]
        if not arg.startswith("T.Cast(\"float32\"") or j >= len(rhs):
            start = j
            continue
        if arg not in seen:
            new, name = erf_f32_lets(arg, str(len(seen)))
            lets += new
            seen[arg] = name
        rhs = rhs[:i] + seen[arg] + rhs[j + 1:]
        start = i


def _dst(offset: str, extent: int) -> str:
    """A TMA destination in the staging buffer. Written with its extent: TVM sizes a block's buffer by the
    regions it sees accessed, and an ``address_of`` is one element (the first runs wrote past a shrunk buffer)."""
    return f"smem.access_ptr(\"w\", offset={offset}, extent={extent})"


def _indent(text: str, n: int) -> str:
    return ("\n" + " " * n).join(text.split("\n"))


def _parse(src: str) -> tvm.tirx.PrimFunc:
    from tvm.script import from_source  # pylint: disable=import-outside-toplevel
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    func = from_source(src, extra_vars={"T": T})
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func


# ---------------------------------------------------------------------------------------------------------------
# The schedule rule: which fused kernels the wgmma kernel can replace, and its epilogue
# ---------------------------------------------------------------------------------------------------------------
_RESERVED = {"T", "smem", "bars", "acc", "desc_a", "desc_b", "bid", "tx", "kt", "kk", "s", "i", "h", "e", "wg",
             "m0", "n0", "A_map", "B_map", "main", "EPR", "EPC", "EPV", "j", "stage", "stage_ptr"}


@dataclass
class _Plan:
    m: int
    n: int
    k: int
    layout: str
    act: object  # tirx.Buffer
    weight: object
    params: list  # the function's parameter buffers, in order
    writes: list  # buffers the kernel writes (one: the output)
    store: str  # the epilogue statement with EPR / EPC / EPV
    acc_cast: str | None


def is_sm90a(target) -> bool:
    """wgmma exists only in the arch-specific sm_90a (not sm_90, not sm_100)."""
    return str(target.attrs.get("arch", "") or "") == "sm_90a"


def plan_kernel(func: tvm.tirx.PrimFunc) -> _Plan | None:
    """What the wgmma kernel needs to replace ``func``, or None where it cannot (see HopperGemm)."""
    from tvm import s_tir, tirx  # pylint: disable=import-outside-toplevel

    from .common import analyze_matmul  # pylint: disable=import-outside-toplevel

    # FuseTIR names buffers after their ops, so one kernel can hold several "lv" or "T_multiply": the printer then
    # renames them and the epilogue text would name the wrong ones. A round trip through TVMScript gives every
    # buffer the unique name the printer uses (same parameters, same order: only names change).
    func = _parse(func.script())
    probe = s_tir.Schedule(func)
    _inline_epilogue_chain(probe, func)
    mm = analyze_matmul(probe)
    if mm is None or mm.batch is None or mm.n is None or mm.k is None or len(mm.n_iters) != 1:
        return None
    if mm.act_dtype != "float16" or mm.weight_dtype != "float16":
        return None
    params = list(func.params)  # (TVM 0.27: the parameters are the buffers)
    if any(not hasattr(b, "shape") or any(not isinstance(d, tirx.IntImm) for d in b.shape) for b in params):
        return None
    names = [b.name for b in params]
    if len(set(names)) != len(names) or \
            any(not nm.isidentifier() or nm in _RESERVED or nm.startswith("ep_") for nm in names):
        return None
    if not any(b.same_as(mm.act) for b in params) or not any(b.same_as(mm.weight) for b in params):
        return None  # a producer (transpose, dequantize...) would have to run inside the kernel
    main = probe.get(mm.block)
    acc_buf = main.writes[0].source
    acc_dtype = str(acc_buf.dtype)
    if acc_dtype not in ("float32", "float16") or not _is_multiply_accumulate(main.body, acc_buf, mm.act, mm.weight):
        return None
    k_var = mm.k_iter.var
    reads = {r.source.name: [x.min for x in r.region] for r in main.reads if not r.source.same_as(acc_buf)}
    a_idx, w_idx = reads.get(mm.act.name), reads.get(mm.weight.name)
    if a_idx is None or w_idx is None:
        return None
    b_vars = [it.var for it in mm.b_iters]
    n_var = mm.n_iters[0].var
    # A[b..., k] exactly (rows flatten to M), W[k, n] ("nn") or W[n, k] ("nt").
    if len(a_idx) < 2 or not a_idx[-1].same_as(k_var) or list(mm.act.shape[-1:]) != [mm.k]:
        return None
    rows = []  # (var, extent) of the activation's row dims, outermost first
    for e, dim in zip(a_idx[:-1], mm.act.shape[:-1]):
        if not isinstance(e, tirx.Var) or not any(e.same_as(v) for v in b_vars):
            return None
        rows.append((e, int(dim)))
    if len(w_idx) != 2 or any(not isinstance(e, tirx.Var) for e in w_idx):
        return None
    if w_idx[0].same_as(k_var) and w_idx[1].same_as(n_var):
        layout = "nn"
    elif w_idx[0].same_as(n_var) and w_idx[1].same_as(k_var):
        layout = "nt"
    else:
        return None
    m, n, k = int(mm.batch), int(mm.n), int(mm.k)
    if k % 8 or (layout == "nn" and n % 8) or m < 64 or n < 64 or k < 64:
        return None  # TMA wants 16-byte row strides; tiny problems belong to other rules
    # Row r of C -> the activation's row indices; column c -> n. (Texts: the epilogue is TVMScript.)
    vmap = {}
    stride = m
    for var, ext in rows:
        stride //= ext
        vmap[var.name] = f"(EPR // {stride} % {ext})" if stride > 1 else f"(EPR % {ext})"
    for it in mm.b_iters:  # unit rows that index nothing
        vmap.setdefault(it.var.name, "0")
    vmap[n_var.name] = "EPC"
    main_idx = [x.min for x in main.writes[0].region]
    if any(not isinstance(x, tirx.Var) or x.name not in vmap for x in main_idx):
        return None
    acc_cast = None if acc_dtype == "float32" else acc_dtype
    if mm.epilogue is None:
        if not any(b.same_as(acc_buf) for b in params):
            return None
        out = acc_buf
        store = f"{acc_buf.name}[{', '.join(vmap[x.name] for x in main_idx)}] = T.Cast(\"{acc_dtype}\", EPV)"
    else:
        ep = probe.get(mm.epilogue)
        if not isinstance(ep.body, tirx.BufferStore) or len(ep.writes) != 1:
            return None
        out = ep.writes[0].source
        if not any(b.same_as(out) for b in params):
            return None
        # The accumulator must be read at "this" element only: the epilogue's iterators then equal the main
        # block's output indices, hence (EPR, EPC); every other read must be a function parameter.
        ep_vars = {iv.var.name for iv in ep.iter_vars}
        acc_reads = [r for r in ep.reads if r.source.same_as(acc_buf)]
        if len(acc_reads) != 1 or len(ep_vars) != len(ep.iter_vars):
            return None
        if any(not r.source.same_as(acc_buf) and not any(b.same_as(r.source) for b in params) for r in ep.reads):
            return None
        acc_idx = [x.min for x in acc_reads[0].region]
        if any(x.extent != 1 for x in acc_reads[0].region):
            return None
        text = _stmt_text(ep.body, params + [acc_buf])
        if text is None:
            return None
        if all(isinstance(e, tirx.Var) and e.name in ep_vars for e in acc_idx) and \
                len({e.name for e in acc_idx}) == len(acc_idx) == len(ep.iter_vars):
            ep_map = {e.name: vmap[mi.name] for e, mi in zip(acc_idx, main_idx)}
            load = f"{acc_buf.name}[{', '.join(e.name for e in acc_idx)}]"
        else:
            ep_map = _reshape_map(ep, acc_idx, main_idx, out, m, n, rows, n_var)
            load = _load_text(text, acc_buf.name)
        if ep_map is None or load is None or load not in text:
            return None
        text = text.replace(load, "EPV")
        for name, expr in sorted(ep_map.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"\b{re.escape(name)}\b", expr, text)
        store = text
    # Every name left in the statement must be a parameter buffer or ours.
    known = {b.name for b in params} | {"T", "EPR", "EPC", "EPV"}
    for ident in re.findall(r"(?<![\w.\"'])([A-Za-z_]\w*)(?![\w\"'])", re.sub(r"\"[^\"]*\"", "", store)):
        if ident not in known:
            return None
    return _Plan(m, n, k, layout, mm.act, mm.weight, params, [out], store, acc_cast)


def _is_multiply_accumulate(body, acc_buf, act, weight) -> bool:
    """``C = C + (cast) A[..] * (cast) W[..]`` exactly (analyze_matmul only checks for a sum of two reads)."""
    from tvm import tirx  # pylint: disable=import-outside-toplevel

    def is_load(e, buf):  # (TVM 0.27: loads are tvm.ir TensorLoad nodes; the buffer is their .source)
        src = getattr(e, "source", None)
        return src is not None and hasattr(e, "indices") and src.same_as(buf)

    def operand(e):
        return e.value if isinstance(e, tirx.Cast) else e

    val = body.value
    if not isinstance(val, tirx.Add):
        return False
    prod = val.b if is_load(val.a, acc_buf) else val.a if is_load(val.b, acc_buf) else None
    if not isinstance(prod, tirx.Mul):
        return False
    a, b = operand(prod.a), operand(prod.b)
    return (is_load(a, act) and is_load(b, weight)) or (is_load(a, weight) and is_load(b, act))


def _reshape_map(ep, acc_idx, main_idx, out, m, n, rows, n_var):
    """The epilogue reshapes the [M, N] result into ``out`` [r0, r1, ..., N] (FuseTIR puts a linear's reshape to
    [batch, seq, N] before its GELU): map the epilogue's iterators (the output's indices) to (EPR, EPC). Only a
    pure row split is taken, and it is checked by evaluating the accumulator's index expressions at sample points
    (they must read row = flat(output row indices), column = the last index). None otherwise."""
    from tvm import tirx  # pylint: disable=import-outside-toplevel

    if len(main_idx) != 2 or len(rows) != 1 or not main_idx[0].same_as(rows[0][0]) or \
            not main_idx[1].same_as(n_var):
        return None
    shape = [int(d) for d in out.shape]
    if shape[-1] != n or int(np_prod(shape[:-1])) != m or len(ep.iter_vars) != len(shape):
        return None
    store_idx = list(ep.body.indices)
    ivars = [iv.var for iv in ep.iter_vars]
    if len(store_idx) != len(shape) or any(not (isinstance(e, tirx.Var) and e.same_as(v))
                                           for e, v in zip(store_idx, ivars)):
        return None
    strides = [int(np_prod(shape[d + 1:-1])) for d in range(len(shape) - 1)]
    rng = __import__("random").Random(0)
    for _ in range(64):
        point = [rng.randrange(d) for d in shape]
        env = {v.name: x for v, x in zip(ivars, point)}
        try:
            got = [_eval_index(e, env) for e in acc_idx]
        except (TypeError, KeyError):
            return None
        if got != [sum(x * st for x, st in zip(point[:-1], strides)), point[-1]]:
            return None
    ep_map = {}
    for d, (v, ext) in enumerate(zip(ivars[:-1], shape[:-1])):
        ep_map[v.name] = f"(EPR // {strides[d]} % {ext})" if strides[d] > 1 else f"(EPR % {ext})"
    ep_map[ivars[-1].name] = "EPC"
    return ep_map


def np_prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _eval_index(e, env) -> int:
    """An integer index expression (vars, constants, + - * // %, casts) at one point."""
    from tvm import tirx  # pylint: disable=import-outside-toplevel

    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        return env[e.name]
    if isinstance(e, tirx.Cast):
        return _eval_index(e.value, env)
    ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
           tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b}
    for cls, fn in ops.items():
        if isinstance(e, cls):
            return fn(_eval_index(e.a, env), _eval_index(e.b, env))
    raise TypeError(type(e).__name__)


def _load_text(text: str, name: str) -> str | None:
    """The one accumulator load in the printed statement (every occurrence must be the same text)."""
    loads = set()
    for start in [mt.start() for mt in re.finditer(rf"(?<![\w.]){re.escape(name)}\[", text)]:
        depth, i = 0, start + len(name)
        while i < len(text):
            depth += {"[": 1, "]": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        loads.add(text[start:i + 1])
    return loads.pop() if len(loads) == 1 else None


def _inline_epilogue_chain(sch, func) -> None:
    """Fold an elementwise chain after the matmul (cast, bias add, the several blocks of an erf-GELU, some reading
    the same intermediate twice) into the block that writes the function's output, so one statement remains."""
    from tvm.s_tir.dlight.analysis import get_root_block  # pylint: disable=import-outside-toplevel

    params = list(func.params)
    for block in sch.get_child_blocks(get_root_block(sch)):
        stmt = sch.get(block)
        if any(iv.iter_type != 0 for iv in stmt.iter_vars):  # reductions stay (0: data parallel)
            continue
        if any(any(w.source.same_as(p) for p in params) for w in stmt.writes):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # pylint: disable=broad-except
            pass  # not inlinable: analyze_matmul then sees more than one epilogue block and declines


def _stmt_text(stmt, buffers) -> str | None:
    """The one-line TVMScript of ``stmt`` (the printer's buffer/var declarations dropped). None where the printer
    had to rename a buffer (two buffers of one name): the text would then not name ``buffers`` as they are."""
    lines = [ln for ln in stmt.script().splitlines() if ln.strip() and not ln.startswith("#")]
    declared = [m.group(1) for m in (re.match(r"^(\w+) = T\.Buffer\(", ln) for ln in lines) if m]
    if any(name not in {b.name for b in buffers} for name in declared):
        return None
    body = [ln for ln in lines if not re.match(r"^\w+ = T\.(Buffer\(|int32\(\)|int64\(\)|float32\(\)|float16\(\))", ln)]
    return body[0].strip() if len(body) == 1 else None


def _region(buf) -> str:
    return f"{buf.name}[{', '.join(f'0:{int(d)}' for d in buf.shape)}]"


# Tile configs the H100 runs chose between (benchmarks/results/hopper_gemm_h100_2026-11-26_run2.json):
# 128x256 at 4096^3 (632 TFLOP/s nt, 595 nn; 128x128 534/487), 128x192 at 4096x1536x384, 128x128 at N = 384.
# 64x192 (one consumer warpgroup) fills the machine at N = 384 (MiniLM b32's Q/K/V/O and FFN-down: 128 blocks on
# 132 SMs, where 128x128 made 96).
CANDIDATES = (HopperConfig(consumers=2, bn=256, stages=4), HopperConfig(consumers=2, bn=192, stages=4),
              HopperConfig(consumers=2, bn=128, stages=6), HopperConfig(consumers=1, bn=192, stages=4))
LEGACY_CANDIDATES = CANDIDATES[:3]
PERSISTENT_MAX_K = 1024
# The staged epilogue where K is short enough for the epilogue to weigh. H100 run 1 (benchmarks/results/
# hopper_gemm_h100_2026-11-26_taskF_run1.json, us, stores from the fragment -> staged): 4096x384x384 8.0 -> 5.6,
# 4096x1536x384 20.2 -> 12.0, with the erf-GELU 21.1 -> 17.8, 4096x384x1536 13.8 -> 11.2. Not measured at 4096^3
# (128x256 would lose a ring stage to the staging tile; there the epilogue is ~1% of the time).
STAGED_MAX_K = 2048
MIN_BLOCKS = 66  # below half a wave the WMMA rule's small tiles and split-K do better (MiniLM batch 1)


def legacy() -> bool:
    """``EMBER_HOPPER_LEGACY=1``: the rule as before the vectorizable erf and the 64-row tiles (128-row
    candidates only, CUDA's erff in the epilogue): the "before" of benchmarks, compiled from the same tree."""
    return os.environ.get("EMBER_HOPPER_LEGACY", "") == "1"


def waves_cost(m: int, n: int, cfg: HopperConfig) -> int:
    """Time model: whole waves of blocks times the work of one block (its tile's area; the K loop is common)."""
    blocks = -(-m // cfg.bm) * -(-n // cfg.bn)
    return -(-blocks // SMS) * cfg.bm * cfg.bn


def choose_config(m: int, n: int, k: int, candidates=None) -> HopperConfig | None:
    """The candidate with the fewest (waves x tile area); ties go to the larger, then the wider tile. None: too few
    blocks. Persistent where more than one wave of tiles each walk a short K: there a block's prologue and epilogue
    are a large share of its time, and the next tile's loads then overlap them (H100, K = 384: 20.5 vs 22.7 us at
    4096x1536, 20.3 vs 21.9 with GELU; at 4096^3 persistent was 1-4% slower; run3 JSON). Staged epilogue
    (:func:`_epilogue`) for K <= STAGED_MAX_K unless ``EMBER_HOPPER_STAGED=0``, with fewer ring stages where the
    staging tile would not fit beside them."""
    if candidates is None:
        candidates = LEGACY_CANDIDATES if legacy() else CANDIDATES
    best = min(candidates, key=lambda c: (waves_cost(m, n, c), -c.bm * c.bn, -c.bn))
    blocks = -(-m // best.bm) * -(-n // best.bn)
    if blocks < MIN_BLOCKS:
        return None
    if blocks > SMS and k <= PERSISTENT_MAX_K:
        best = dataclasses.replace(best, persistent=True)
    if k <= STAGED_MAX_K and not legacy() and os.environ.get("EMBER_HOPPER_STAGED", "") != "0":
        best = with_staging(best)
    return best


def with_staging(cfg: HopperConfig) -> HopperConfig:
    """``cfg`` with the staged epilogue, dropping ring stages (not below 3) until the staging tile fits with 1 KiB
    to spare (128x128 x 6 stages would fill the 227 KiB to the byte: never run that way); ``cfg`` unchanged where
    it never does."""
    def roomy(c):
        return c.smem_bytes() + 2048 <= SMEM_LIMIT

    staged = dataclasses.replace(cfg, staged=True)
    while not roomy(staged) and staged.stages > 3:
        staged = dataclasses.replace(staged, stages=staged.stages - 1)
    return staged if roomy(staged) else cfg


class HopperGemm:
    """fp16 GEMMs (fp32 or fp16 accumulation, any injective epilogue that reads only its own element and
    function parameters: bias add, casts, GELU...) on wgmma for CUDA ``sm_90a``. Declines (None) for other
    targets, symbolic shapes, operands that need a producer inside the kernel (dequantize, transpose), batched
    matmuls and tiny problems. ``config``: force one tile config."""

    def __init__(self, config: HopperConfig | None = None):
        self.config = config

    def __repr__(self) -> str:
        return f"ember.HopperGemm({self.config or 'auto'})"

    def apply(self, func, target, _tunable: bool = False):
        from tvm import s_tir, tirx  # pylint: disable=import-outside-toplevel

        from .common import is_cuda  # pylint: disable=import-outside-toplevel

        if not isinstance(func, tirx.PrimFunc) or not is_cuda(target) or not is_sm90a(target):
            return None
        if "dlight.do_not_tensorize" in (func.attrs or {}):
            return None
        try:
            plan = plan_kernel(func)
        except Exception:  # pylint: disable=broad-except
            return None  # a kernel shape the analysis does not know: the next rule takes it
        if plan is None:
            return None
        cfg = self.config or choose_config(plan.m, plan.n, plan.k)
        if cfg is None:
            return None
        if cfg.staged and (str(plan.writes[0].dtype) != "float16" or plan.n % 8):
            cfg = dataclasses.replace(cfg, staged=False)  # the copy-out moves 16-byte row chunks of fp16
        sig = ", ".join(f"{b.name}: T.Buffer(({', '.join(str(int(d)) for d in b.shape)},), \"{b.dtype}\")"
                        for b in plan.params)
        reads = ", ".join(_region(b) for b in plan.params if not any(b.same_as(w) for w in plan.writes))
        kernel = None
        # Staged with the vectorizable erf first; where TVMScript does not take that back, stores from the fragment
        # with the statement as FuseTIR wrote it; where neither parses, the WMMA rule schedules the kernel.
        tries = [(cfg, True), (dataclasses.replace(cfg, staged=False), False)] if not legacy() else [(cfg, False)]
        for c, fast_erf in tries:
            src = _source(plan.m, plan.n, plan.k, plan.layout, c, signature=sig, a_name=plan.act.name,
                          b_name=plan.weight.name, reads=reads, writes=", ".join(_region(b) for b in plan.writes),
                          store=plan.store, acc_cast=plan.acc_cast, fast_erf=fast_erf)
            try:
                kernel = _parse(src)
                break
            except Exception:  # pylint: disable=broad-except
                continue
        if kernel is None:
            return None
        for key, val in (func.attrs or {}).items():
            if key != "tirx.is_scheduled":
                kernel = kernel.with_attr(key, val)
        return s_tir.Schedule(kernel)
