"""Fused attention kernels (TIR), one per target family, generated for the shapes of one attention site.

Both compute, for every batch ``b``, head ``h`` and query row ``i``::

    s[j]    = (Q[b, h, i, :] . K[b, h, j, :]) * scale + mask[b, h, i, j]      (mask optional, broadcastable)
    out[i]  = sum_j softmax(s)[j] * V[b, h, j, :]

with **online softmax** over blocks of keys (running max ``m``, running sum ``l``, output rescaled by
``exp(m_old - m_new)`` whenever the max grows), so no ``seq x seq`` score matrix is ever allocated: the largest
temporary is one block of scores.

* CPU (:func:`cpu_attention`): the outer loop runs over ``(batch, head, block of BR query rows)`` in parallel.
  Per task it copies a block of ``BC`` keys transposed into a ``D x BC`` scratch buffer, so the score loop
  ``s[j] += q[d] * Kt[d, j]`` is a contiguous, vectorized FMA over keys; the value product ``o[d] += p[j] *
  V[j, d]`` is vectorized over the head dimension; both run on a register tile of 4 query rows at a time, like a
  GEMM micro-kernel. Accumulation is float32 for every input dtype.
* CUDA (:func:`cuda_attention`): flash-attention style. One thread block per ``(block of query rows, batch x
  head)``, one thread per query row (its q row and output accumulator live in registers), key/value tiles staged
  in shared memory by all threads cooperatively; every block of ``BC`` scores is computed, max-reduced and
  exponentiated in registers before the output is rescaled once per tile. Used for fp32 (and where there are no
  tensor cores).
* CUDA fp16 on tensor cores (:func:`cuda_attention_tc`, NVIDIA sm_80+): FlashAttention-2 style on PTX
  ``mma.sync.m16n8k16`` (fp16 x fp16 -> fp32), one warp per 16 query rows, scores/softmax/output in registers;
  on the H100 at seq 2048 (12 heads, dh 64) 0.10 ms, 5x the unfused graph (BENCHMARKS.md).
* CUDA fp16, short sequences (:func:`cuda_attention_tc_resident`): the same math with all of a head's K and V (and
  a row-invariant mask) copied once per block into shared memory by cp.async, fragments by ldmatrix, up to 8 query
  warps per block; MiniLM at batch 32 on the H100 7.5-8.7 us per layer instead of 20.3.
  :func:`cuda_attention_tensor_cores` picks between the two.

Layouts: Q/K/V/out are 4-D in either ``bshd`` (what a linear layer's output reshaped to heads is, so reading it
costs no transpose) or ``bhsd``. The mask, when present, is 4-D with every dimension either 1 (broadcast) or full.
The batch dimension may be symbolic (a dynamic-batch model); the other dimensions are compile-time constants.

The kernels are written as TVMScript text filled in per site (index expressions differ by layout and
broadcasting) and parsed; they are marked ``tirx.is_scheduled`` because they carry their own schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from ..schedules.gpu.cuda_async import (cp_async16_source, cp_async_commit_source, cp_async_wait_source,
                                        ldmatrix_x4_source)

# Lowest finite float32: the initial running max. Using it instead of -inf keeps exp(m_old - m_new) finite
# when a whole key block is masked with -inf (exp(-inf - (-inf)) would be NaN).
_LOWEST = -3.4028234663852886e38


@dataclass(frozen=True)
class AttentionSpec:
    batch: int | None  # None: symbolic (dynamic batch)
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str  # of Q, K, V and the output
    q_layout: str = "bhsd"  # "bshd" or "bhsd"
    k_layout: str = "bhsd"
    v_layout: str = "bhsd"
    out_layout: str = "bhsd"
    scale: float = 1.0
    mask_shape: tuple | None = None  # 4 ints, each 1 or the full extent; None: no mask
    mask_dtype: str = "float32"
    mask_batch_symbolic: bool = False  # the mask's batch dim is the (symbolic) batch
    out_dtype: str | None = None  # of the output, when not ``dtype`` (GPU kernels only)
    exact_p: bool = False  # tensor-core kernel: P as two fp16 parts (hi + lo), for graphs whose P @ V is fp32

    @property
    def o_dtype(self) -> str:
        return self.out_dtype or self.dtype

    def shape(self, layout: str, seq: int):
        b = "B" if self.batch is None else str(self.batch)
        return (f"({b}, {self.heads}, {seq}, {self.head_dim})" if layout == "bhsd"
                else f"({b}, {seq}, {self.heads}, {self.head_dim})")

    def ops(self) -> list:
        """The graph ops this kernel replaces (for the kernel report)."""
        ops = ["matmul(q,k)", "multiply(scale)"]
        if self.mask_shape is not None:
            ops.append("add(mask)")
        return ops + ["softmax", "matmul(p,v)"]


def _index(name: str, layout: str, b: str, h: str, s: str, d: str) -> str:
    return f"{name}[{b}, {h}, {s}, {d}]" if layout == "bhsd" else f"{name}[{b}, {s}, {h}, {d}]"


def _mask_index(spec: AttentionSpec, b: str, h: str, i: str, j: str) -> str:
    mb, mh, mi, mj = spec.mask_shape
    bsym = spec.mask_batch_symbolic
    idx = [b if (bsym or mb != 1) else "0", h if mh != 1 else "0", i if mi != 1 else "0", j if mj != 1 else "0"]
    return f"Mk[{', '.join(idx)}]"


def _mask_shape_text(spec: AttentionSpec) -> str:
    mb = "B" if spec.mask_batch_symbolic else str(spec.mask_shape[0])
    return f"({mb}, {spec.mask_shape[1]}, {spec.mask_shape[2]}, {spec.mask_shape[3]})"


def _pick_block(extent: int, preferred: int) -> int:
    """A block size <= preferred, the largest divisor of ``extent`` >= preferred / 2 if any (no tail)."""
    if extent <= preferred:
        return extent
    for t in range(preferred, preferred // 2 - 1, -1):
        if extent % t == 0:
            return t
    return preferred


def _signature(spec: AttentionSpec) -> tuple[str, str]:
    params = ["q_h: T.handle", "k_h: T.handle", "v_h: T.handle"]
    if spec.mask_shape is not None:
        params.append("m_h: T.handle")
    params.append("o_h: T.handle")
    lines = []
    if spec.batch is None:
        lines.append("B = T.int64()")
    lines += [
        f"Q = T.match_buffer(q_h, {spec.shape(spec.q_layout, spec.q_len)}, \"{spec.dtype}\")",
        f"K = T.match_buffer(k_h, {spec.shape(spec.k_layout, spec.kv_len)}, \"{spec.dtype}\")",
        f"V = T.match_buffer(v_h, {spec.shape(spec.v_layout, spec.kv_len)}, \"{spec.dtype}\")",
    ]
    if spec.mask_shape is not None:
        lines.append(f"Mk = T.match_buffer(m_h, {_mask_shape_text(spec)}, \"{spec.mask_dtype}\")")
    lines.append(f"O = T.match_buffer(o_h, {spec.shape(spec.out_layout, spec.q_len)}, \"{spec.o_dtype}\")")
    return ", ".join(params), "\n".join("    " + ln for ln in lines)


def _subst(src: str, names: dict) -> str:
    """Replace whole-word names by parenthesized index expressions (the kernels derive batch, head and block
    offsets from the loop variables; writing them inline keeps every block's read/write regions in terms of
    loop variables only)."""
    import re

    for name, expr in names.items():
        src = re.sub(rf"\b{name}\b", f"({expr})", src)
    return src


def _regions(spec: AttentionSpec) -> tuple[str, str]:
    """``T.reads(...)`` / ``T.writes(...)`` for a kernel's one opaque block: whole input and output buffers.
    (Stated explicitly: inference would also list the block's own scratch buffers, which is ill-formed.)"""

    def full(name, shape_text):
        dims = [d.strip() for d in shape_text.strip("()").split(",")]
        return f"{name}[{', '.join('0:' + d for d in dims)}]"

    reads = [full("Q", spec.shape(spec.q_layout, spec.q_len)), full("K", spec.shape(spec.k_layout, spec.kv_len)),
             full("V", spec.shape(spec.v_layout, spec.kv_len))]
    if spec.mask_shape is not None:
        reads.append(full("Mk", _mask_shape_text(spec)))
    return f"T.reads({', '.join(reads)})", f"T.writes({full('O', spec.shape(spec.out_layout, spec.q_len))})"


def _parse(src: str) -> tvm.tirx.PrimFunc:
    from tvm.script import from_source
    from tvm.script import tirx as T

    func = from_source(src, extra_vars={"T": T})
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return func


def _fast_math(func):
    """Use the CPU rules' vectorizable exp when it is available (LLVM would call libm's expf per element)."""
    try:
        from ..schedules.cpu.fast_math import rewrite_transcendentals  # pylint: disable=import-outside-toplevel
    except ImportError:
        return func
    try:
        return rewrite_transcendentals(func)
    except Exception:  # pylint: disable=broad-except
        return func


def _tree(op: str, terms: list) -> str:
    """``terms`` combined pairwise (depth log2(n) instead of an n-long chain): ``op`` is ``"+"`` or ``"max"``."""
    terms = list(terms)
    while len(terms) > 1:
        pairs = [(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)]
        nxt = [f"({a} + {b})" if op == "+" else f"T.max({a}, {b})" for a, b in pairs]
        terms = nxt + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def _vector_loops(var: str, extent: int, lanes: int, indent: int) -> tuple[str, str]:
    """Loops over ``extent`` elements as unrolled whole vectors (``var`` = ``{var}v * lanes + {var}l``), so every
    vector op is one register wide, or one vector of ``extent`` lanes when that is not a multiple of ``lanes``.
    Returns the loop header lines (ending at the body's indentation) and the index expression."""
    pad = " " * indent
    if extent % lanes == 0 and extent > lanes:
        head = f"{pad}for {var}v in T.unroll({extent // lanes}):\n{pad}    for {var}l in T.vectorized({lanes}):"
        return head, f"{var}v * {lanes} + {var}l"
    return f"{pad}for {var}l in T.unroll(1):\n{pad}    for {var}x in T.vectorized({extent}):", f"{var}x"


CPU_ROW_GROUP = 4  # query rows per register tile of the CPU kernel (measured: 2, 6 and 8 are slower, see below)


def cpu_attention(spec: AttentionSpec, lanes: int = 16) -> tvm.tirx.PrimFunc:
    """The CPU kernel for ``spec`` (see module doc). ``lanes``: float32 SIMD lanes of the target.

    Query rows are processed ``G`` = :data:`CPU_ROW_GROUP` at a time, as a register tile like a GEMM
    micro-kernel: the scores of G rows x BC keys are ``D`` steps of G broadcast q values times BC/lanes vectors
    of the transposed key block (each key vector loaded once for G rows, G x BC/lanes independent FMA chains:
    16 accumulators for BC = 64 on AVX-512); then per row the scale + mask, the running max, ``exp`` and sum
    (max and sum combine whole vectors first, then one vector's lanes as a tree); then the value product is one
    loop over the BC keys doing G broadcast probabilities times D/lanes vectors of that key's V row (loaded once
    for G rows; G x D/lanes accumulators). Scratch buffers indexed only by unrolled loops (``Sc``, ``A``) are
    promoted to vector registers by LLVM. One query row at a time (the previous kernel) ran MiniLM b8's
    attention in 2.16 ms a layer on this 2-core AVX-512 machine, four rows 1.17 ms (2, 6 and 8 rows: 1.44,
    1.71, 1.45 ms: fewer shared loads, or more accumulators than registers).
    Q is scaled as it is copied (one multiply per q element instead of one per score). Key-block tails get a
    score of float32's lowest value (probability exactly 0) with their K/V reads clamped to the last real key,
    query-row tails have clamped reads and guarded writes, so every loop has a constant trip count and no
    read is out of bounds.
    """
    D, Sq, Sk, H = spec.head_dim, spec.q_len, spec.kv_len, spec.heads
    G = min(CPU_ROW_GROUP, Sq)
    BR = _pick_block(Sq, 64)
    BR -= BR % G
    BC = _pick_block(Sk, 4 * lanes if Sk >= 4 * lanes else Sk)
    NQB = (Sq + BR - 1) // BR
    NKB = (Sk + BC - 1) // BC
    q_tail, k_tail = Sq % BR != 0, Sk % BC != 0
    batch = "B" if spec.batch is None else str(spec.batch)
    params, header = _signature(spec)
    reads, writes = _regions(spec)
    f32 = "\"float32\""

    def clamp_q(row):
        return f"T.min(q0 + {row}, {Sq - 1})" if q_tail else f"q0 + {row}"

    def clamp_k(col):
        return f"T.min(k0 + {col}, {Sk - 1})" if k_tail else f"k0 + {col}"

    j4, j = _vector_loops("j", BC, lanes, 24)  # key loops at the per-row level of the group
    j7, j_ = _vector_loops("j", BC, lanes, 28)
    d4, d = _vector_loops("d", D, lanes, 24)
    d7, d_ = _vector_loops("d", D, lanes, 28)
    score = f"Sc[g, {j}]"
    if spec.mask_shape is not None:
        score += f" + T.Cast({f32}, {_mask_index(spec, 'b', 'h', clamp_q('r0 + g'), clamp_k(j))})"
    if k_tail:
        score = f"T.if_then_else(k0 + {j} < {Sk}, {score}, T.float32({_LOWEST!r}))"
    # the lanes of the row max / sum: whole vectors combined lane-wise into Pv, then Pv's lanes as a tree
    width = lanes if BC % lanes == 0 else BC
    part = [f"P[g, {t * lanes} + l]" for t in range(BC // lanes)] if BC % lanes == 0 else ["P[g, l]"]
    lane_terms = [f"Pv[g, {t}]" for t in range(width)]
    src = f"""
@T.prim_func(s_tir=True)
def main({params}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{header}
    for task in T.parallel({batch} * {H * NQB}):
        with T.sblock("attention_tile"):
            {reads}
            {writes}
            Qs = T.alloc_buffer(({BR}, {D}), "float32")
            Kt = T.alloc_buffer(({D}, {BC}), "float32")
            Sc = T.alloc_buffer(({G}, {BC}), "float32")
            P = T.alloc_buffer(({G}, {BC}), "float32")
            Pv = T.alloc_buffer(({G}, {width}), "float32")
            A = T.alloc_buffer(({G}, {D}), "float32")
            Acc = T.alloc_buffer(({BR}, {D}), "float32")
            Mx = T.alloc_buffer(({BR},), "float32")
            L = T.alloc_buffer(({BR},), "float32")
            Rm = T.alloc_buffer(({G},), "float32")
            Rc = T.alloc_buffer(({G},), "float32")
            for i in range({BR}):
                for d in T.vectorized({D}):
                    Qs[i, d] = T.Cast({f32}, {_index("Q", spec.q_layout, "b", "h", clamp_q("i"), "d")}) * T.float32({spec.scale!r})
                    Acc[i, d] = T.float32(0)
                Mx[i] = T.float32({_LOWEST!r})
                L[i] = T.float32(0)
            for kb in range({NKB}):
                for j in range({BC}):
                    for d in range({D}):
                        Kt[d, j] = T.Cast({f32}, {_index("K", spec.k_layout, "b", "h", clamp_k("j"), "d")})
                for rg in range({BR // G}):
                    for g in T.unroll({G}):
{j4}
                                Sc[g, {j}] = T.float32(0)
                    for d in T.unroll({D}):
                        for g in T.unroll({G}):
{j7}
                                    Sc[g, {j_}] = Sc[g, {j_}] + Qs[r0 + g, d] * Kt[d, {j_}]
                    for g in T.unroll({G}):
{j4}
                                P[g, {j}] = {score}
                        for l in T.vectorized({width}):
                            Pv[g, l] = {_tree("max", part)}
                        Rm[g] = T.max(Mx[r0 + g], {_tree("max", lane_terms)})
{j4}
                                P[g, {j}] = T.exp(P[g, {j}] - Rm[g])
                        for l in T.vectorized({width}):
                            Pv[g, l] = {_tree("+", part)}
                        Rc[g] = T.exp(Mx[r0 + g] - Rm[g])
                        L[r0 + g] = L[r0 + g] * Rc[g] + {_tree("+", lane_terms)}
                        Mx[r0 + g] = Rm[g]
{d4}
                                A[g, {d}] = T.float32(0)
                    for j in range({BC}):
                        for g in T.unroll({G}):
{d7}
                                        A[g, {d_}] = A[g, {d_}] + P[g, j] * T.Cast({f32}, {_index("V", spec.v_layout, "b", "h", clamp_k("j"), d_)})
                    for g in T.unroll({G}):
{d4}
                                Acc[r0 + g, {d}] = Acc[r0 + g, {d}] * Rc[g] + A[g, {d}]
            for i in range({BR}):
                {f"if q0 + i < {Sq}:" if q_tail else "if True:"}
                    for d in T.vectorized({D}):
                        {_index("O", spec.out_layout, "b", "h", "q0 + i", "d")} = T.Cast("{spec.dtype}", Acc[i, d] / L[i])
"""
    src = _subst(src, {"b": f"task // {H * NQB}", "h": f"task % {H * NQB} // {NQB}", "q0": f"task % {NQB} * {BR}",
                       "k0": f"kb * {BC}", "r0": f"rg * {G}"})
    return _fast_math(_parse(src))


def cuda_attention(spec: AttentionSpec, rows: int = 64, keys: int = 32) -> tvm.tirx.PrimFunc:
    """The CUDA kernel for ``spec``: flash-attention style (see module doc)."""
    D, Sq, Sk, H = spec.head_dim, spec.q_len, spec.kv_len, spec.heads
    BR = rows
    BC = min(keys, Sk)
    NQB = (Sq + BR - 1) // BR
    NKB = (Sk + BC - 1) // BC
    batch = "B" if spec.batch is None else str(spec.batch)
    params, header = _signature(spec)
    reads, writes = _regions(spec)
    f32 = "\"float32\""
    qi = f"T.min(q0 + tx, {Sq - 1})"
    kj = f"T.min(k0 + j, {Sk - 1})"
    score = f"S[j] * T.float32({spec.scale!r})"
    if spec.mask_shape is not None:
        score += f" + T.Cast({f32}, {_mask_index(spec, 'b', 'h', qi, kj)})"
    score = f"T.if_then_else(k0 + j < {Sk}, {score}, T.float32({_LOWEST!r}))"
    src = f"""
@T.prim_func(s_tir=True)
def main({params}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{header}
    for bx in T.thread_binding({NQB}, thread="blockIdx.x"):
        for by in T.thread_binding({batch} * {H}, thread="blockIdx.y"):
            for tx in T.thread_binding({BR}, thread="threadIdx.x"):
                with T.sblock("flash_attention"):
                    {reads}
                    {writes}
                    Ks = T.alloc_buffer(({BC}, {D}), "float32", scope="shared")
                    Vs = T.alloc_buffer(({BC}, {D}), "float32", scope="shared")
                    q = T.alloc_buffer(({D},), "float32", scope="local")
                    acc = T.alloc_buffer(({D},), "float32", scope="local")
                    S = T.alloc_buffer(({BC},), "float32", scope="local")
                    st = T.alloc_buffer((4,), "float32", scope="local")
                    for d in T.unroll({D}):
                        q[d] = T.Cast({f32}, {_index("Q", spec.q_layout, "b", "h", qi, "d")})
                        acc[d] = T.float32(0)
                    st[0] = T.float32({_LOWEST!r})
                    st[1] = T.float32(0)
                    for kb in range({NKB}):
                        for e in range({(BC * D + BR - 1) // BR}):
                            if e * {BR} + tx < {BC * D}:
                                Ks[(e * {BR} + tx) // {D}, (e * {BR} + tx) % {D}] = T.Cast({f32}, {_index("K", spec.k_layout, "b", "h", f"T.min(k0 + (e * {BR} + tx) // {D}, {Sk - 1})", f"(e * {BR} + tx) % {D}")})
                                Vs[(e * {BR} + tx) // {D}, (e * {BR} + tx) % {D}] = T.Cast({f32}, {_index("V", spec.v_layout, "b", "h", f"T.min(k0 + (e * {BR} + tx) // {D}, {Sk - 1})", f"(e * {BR} + tx) % {D}")})
                        T.tvm_storage_sync("shared")
                        st[2] = st[0]
                        for j in range({BC}):
                            S[j] = T.float32(0)
                            for d in T.unroll({D}):
                                S[j] = S[j] + q[d] * Ks[j, d]
                            S[j] = {score}
                            st[2] = T.max(st[2], S[j])
                        st[3] = T.exp(st[0] - st[2])
                        st[1] = st[1] * st[3]
                        for d in T.unroll({D}):
                            acc[d] = acc[d] * st[3]
                        for j in range({BC}):
                            S[j] = T.exp(S[j] - st[2])
                            st[1] = st[1] + S[j]
                            for d in T.unroll({D}):
                                acc[d] = acc[d] + S[j] * Vs[j, d]
                        st[0] = st[2]
                        T.tvm_storage_sync("shared")
                    if q0 + tx < {Sq}:
                        for d in T.unroll({D}):
                            {_index("O", spec.out_layout, "b", "h", "q0 + tx", "d")} = T.Cast("{spec.o_dtype}", acc[d] / st[1])
"""
    src = _subst(src, {"b": f"by // {H}", "h": f"by % {H}", "q0": f"bx * {BR}", "k0": f"kb * {BC}"})
    return _parse(src)



# ---------------------------------------------------------------------------------------------------------------
# CUDA, fp16 on tensor cores (mma.sync m16n8k16, FlashAttention-2 style)
TC_MAX_HEAD_DIM = 128  # registers per thread grow with D (the output accumulator is D / 2 floats per thread)
_LOG2E = 1.4426950408889634


def _mma_text(a: str, a_off: str, b_: str, b_off: str, c: str, c_off: str) -> str:
    """TVMScript of one ``mma.sync.m16n8k16`` (fp16 x fp16 -> fp32) on local fragment arrays at element offsets."""
    return (f"T.evaluate(T.ptx_legacy.mma(\"m16n8k16\", \"row\", \"col\", \"fp16\", \"fp16\", \"fp32\", "
            f"{a}.data, {a_off}, {b_}.data, {b_off}, {c}.data, {c_off}, False, dtype=\"float32\"))")


def _shfl_text(x: str, lane_mask: int) -> str:
    return f"T.tvm_warp_shuffle_xor(T.uint32(4294967295), {x}, {lane_mask}, 32, 32)"


def _online_softmax_text(nc: int, nd: int, score: str) -> str:
    """TVMScript (at the tensor-core kernels' score-loop indentation) of one online-softmax step over a block of
    scores in mma accumulator layout: each thread holds rows ``tx // 4`` and ``+ 8`` (``r``), the row max and sum
    are reduced over the 4 lanes of a quad, the running max ``m`` moves, the sum ``lsum`` and the output ``o``
    are rescaled by ``exp2(m_old - m_new)``, and ``s`` becomes the unnormalized probabilities."""
    return f"""                            for r in T.unroll(2):
                                al[r] = m[r]
                                for j in T.unroll({nc}):
                                    for e in T.unroll(2):
                                        s[j * 4 + r * 2 + e] = {score}
                                        al[r] = T.max(al[r], s[j * 4 + r * 2 + e])
                                al[r] = T.max(al[r], {_shfl_text("al[r]", 1)})
                                al[r] = T.max(al[r], {_shfl_text("al[r]", 2)})
                                mo[r] = m[r]  # the old max; al[r]: the new one
                                m[r] = al[r]
                                al[r] = T.exp2(mo[r] - m[r])  # this row's rescale factor
                                lsum[r] = lsum[r] * al[r]
                                for j in T.unroll({nc}):
                                    for e in T.unroll(2):
                                        s[j * 4 + r * 2 + e] = T.exp2(s[j * 4 + r * 2 + e] - m[r])
                                        lsum[r] = lsum[r] + s[j * 4 + r * 2 + e]
                                for n in T.unroll({nd}):
                                    for e in T.unroll(2):
                                        o[n * 4 + r * 2 + e] = o[n * 4 + r * 2 + e] * al[r]"""


def tensor_core_eligible(spec: AttentionSpec) -> bool:
    """fp16 Q/K/V with a head dim the 16-wide mma tiles cover (a multiple of 16, at most 128)."""
    return (spec.dtype == "float16" and spec.head_dim % 16 == 0 and spec.head_dim <= TC_MAX_HEAD_DIM
            and (spec.mask_shape is None or "float" in spec.mask_dtype))


def cuda_attention_tc(spec: AttentionSpec, warps: int | None = None, keys: int = 64) -> tvm.tirx.PrimFunc:
    """fp16 attention on tensor cores, FlashAttention-2 style, for :func:`tensor_core_eligible` sites.

    One thread block per ``(BR = 16 * warps query rows, batch x head)``; each warp owns 16 query rows and keeps
    everything of them in registers, using PTX ``mma.sync.m16n8k16`` (fp16 x fp16 -> fp32) whose per-lane
    fragment layout is fixed by the PTX ISA: lane ``l`` (``g = l // 4``, ``t = l % 4``) holds rows ``g`` and
    ``g + 8`` of a 16 x 8 accumulator tile, columns ``2t, 2t + 1``::

        Q tile -> shared (through the K buffer) -> A fragments (16 x D fp16, registers, loaded once)
        O = 0 (16 x D fp32 in registers);  m = lowest, l = 0          (per row; partial l per lane)
        for each block of BC keys:
            K, V tiles [BC, D] -> shared (16-byte loads by all threads of the block)
            S = Q K^T: (BC / 8) x (D / 16) mma, fp32 accumulators in registers
            s = S * scale + mask (log2 domain); m' = max(m, row max)  (the 4 lanes of a row: 2 warp shuffles)
            p = 2^(s - m'); l = l * 2^(m - m') + sum p;  O *= 2^(m - m')          (rows are known: no shared)
            O += P V: the S accumulators of two adjacent 8-key tiles ARE the A fragment of a 16-key tile
                (FlashAttention-2's register reuse), so P never leaves registers; V fragments from shared
        out = O / (sum of l over the row's 4 lanes)

    P is rounded to fp16 for the second product (as FlashAttention does); scores, softmax and sums are fp32.
    Nothing of size seq x seq exists anywhere; shared memory is the two K/V tiles (18 KiB for D = 64).
    """
    if not tensor_core_eligible(spec):
        raise ValueError(f"cuda_attention_tc: {spec} is not eligible (fp16, head_dim % 16 == 0, <= "
                         f"{TC_MAX_HEAD_DIM})")
    D, Sq, Sk, H = spec.head_dim, spec.q_len, spec.kv_len, spec.heads
    if warps is None:
        warps = 4 if Sq >= 512 else 2  # short sequences: smaller query tiles give the SMs more blocks
    BR, NT, BC = 16 * warps, 32 * warps, keys
    assert BC >= BR and BC % 16 == 0, "the Q tile is staged through the K buffer"
    NQB, NKB = (Sq + BR - 1) // BR, (Sk + BC - 1) // BC
    # Shared tiles are 1-D with rows of D + 8 halves: the 8 row groups of a fragment load then hit different
    # banks (a 2-D buffer would be compacted back to D columns by TVM, padding and all)
    LD = D + 8
    FD, NC, ND, FC = D // 16, BC // 8, D // 8, BC // 16
    batch = "B" if spec.batch is None else str(spec.batch)
    params, header = _signature(spec)
    reads, writes = _regions(spec)
    f32 = "\"float32\""
    # fragment element i of the lane: accumulator row g + 8 * (i // 2), column 2t + i % 2 (of an 8-wide tile)
    qrow = "q0 + ty * 16 + tx // 4 + r * 8"
    kcol = "k0 + j * 8 + tx % 4 * 2 + e"
    score = f"s[j * 4 + r * 2 + e] * T.float32({spec.scale * _LOG2E!r})"
    if spec.mask_shape is not None:
        mi = _mask_index(spec, "b", "h", f"T.min({qrow}, {Sq - 1})", f"T.min({kcol}, {Sk - 1})")
        score += f" + T.Cast({f32}, {mi}) * T.float32({_LOG2E!r})"
    if Sk % BC:
        score = f"T.if_then_else({kcol} < {Sk}, {score}, T.float32({_LOWEST!r}))"

    def tile_load(dst: str, src: str, rows: int, seq_base: str, seq_len: int, layout: str) -> str:
        """dst[rows, D] <- src rows seq_base.. (clamped to the last one), 8 halves (16 bytes) per thread and step."""
        per = rows * D // 8
        e = f"(it * {NT} + ty * 32 + tx)"
        guard = f"if {e} < {per}:" if per % NT else "if True:"
        seq = f"T.min({seq_base} + {e} // {D // 8}, {seq_len - 1})"
        return (f"for it in range({(per + NT - 1) // NT}):\n"
                f"    {guard}\n"
                f"        for v in T.vectorized(8):\n"
                f"            {dst}[{e} // {D // 8} * {LD} + {e} % {D // 8} * 8 + v] = "
                f"{_index(src, layout, 'b', 'h', seq, f'{e} % {D // 8} * 8 + v')}")

    def indent(text: str, n: int) -> str:
        return ("\n" + " " * n).join(text.split("\n"))


    out_idx = _index("O", spec.out_layout, "b", "h", qrow, "n * 8 + tx % 4 * 2 + e")
    # exact_p: P = hi + lo, both fp16 (lo = the rounding error of hi), two products: P's error ~2^-22 instead of
    # 2^-11, for graphs that multiply an fp32 P with V (the torch importer's fp16 attention)
    p_lo, pv_lo = "", ""
    if spec.exact_p:
        p_lo = ("\n" + " " * 36 + "pl[i] = T.Cast(\"float16\", s[(kk * 2 + i // 4) * 4 + i % 4] - "
                "T.Cast(\"float32\", pa[i]))")
        pv_lo = "\n" + " " * 36 + _mma_text("pl", "0", "kb", "0", "o", "n * 4")
    pad = 24
    src = f"""
@T.prim_func(s_tir=True)
def main({params}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{header}
    for bx in T.thread_binding({NQB}, thread="blockIdx.x"):
        for by in T.thread_binding({batch} * {H}, thread="blockIdx.y"):
            for ty in T.thread_binding({warps}, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("flash_attention_mma"):
                        {reads}
                        {writes}
                        Ks = T.alloc_buffer(({BC * LD},), "float16", scope="shared")
                        Vs = T.alloc_buffer(({BC * LD},), "float16", scope="shared")
                        qa = T.alloc_buffer(({FD * 8},), "float16", scope="local")
                        pa = T.alloc_buffer((8,), "float16", scope="local")
                        pl = T.alloc_buffer((8,), "float16", scope="local")
                        kb = T.alloc_buffer((4,), "float16", scope="local")
                        s = T.alloc_buffer(({NC * 4},), "float32", scope="local")
                        o = T.alloc_buffer(({ND * 4},), "float32", scope="local")
                        m = T.alloc_buffer((2,), "float32", scope="local")
                        lsum = T.alloc_buffer((2,), "float32", scope="local")
                        al = T.alloc_buffer((2,), "float32", scope="local")
                        mo = T.alloc_buffer((2,), "float32", scope="local")
                        {indent(tile_load("Ks", "Q", BR, "q0", Sq, spec.q_layout), pad)}
                        T.tvm_storage_sync("shared")
                        for kk in T.unroll({FD}):
                            for i in T.unroll(4):
                                for e in T.unroll(2):
                                    qa[kk * 8 + i * 2 + e] = Ks[(ty * 16 + tx // 4 + i % 2 * 8) * {LD} + kk * 16 + tx % 4 * 2 + i // 2 * 8 + e]
                        for i in T.unroll({ND * 4}):
                            o[i] = T.float32(0)
                        for r in T.unroll(2):
                            m[r] = T.float32({_LOWEST!r})
                            lsum[r] = T.float32(0)
                        T.tvm_storage_sync("shared")
                        for kb_ in range({NKB}):
                            {indent(tile_load("Ks", "K", BC, "k0", Sk, spec.k_layout), pad + 4)}
                            {indent(tile_load("Vs", "V", BC, "k0", Sk, spec.v_layout), pad + 4)}
                            T.tvm_storage_sync("shared")
                            for i in T.unroll({NC * 4}):
                                s[i] = T.float32(0)
                            for j in T.unroll({NC}):
                                for kk in T.unroll({FD}):
                                    for i in T.unroll(2):
                                        for e in T.vectorized(2):
                                            kb[i * 2 + e] = Ks[(j * 8 + tx // 4) * {LD} + kk * 16 + tx % 4 * 2 + i * 8 + e]
                                    {_mma_text("qa", "kk * 8", "kb", "0", "s", "j * 4")}
{_online_softmax_text(NC, ND, score)}
                            for kk in T.unroll({FC}):
                                for i in T.unroll(8):
                                    pa[i] = T.Cast("float16", s[(kk * 2 + i // 4) * 4 + i % 4]){p_lo}
                                for n in T.unroll({ND}):
                                    for i in T.unroll(4):
                                        kb[i] = Vs[(kk * 16 + tx % 4 * 2 + i % 2 + i // 2 * 8) * {LD} + n * 8 + tx // 4]
                                    {_mma_text("pa", "0", "kb", "0", "o", "n * 4")}{pv_lo}
                            T.tvm_storage_sync("shared")
                        for r in T.unroll(2):
                            lsum[r] = lsum[r] + {_shfl_text("lsum[r]", 1)}
                            lsum[r] = lsum[r] + {_shfl_text("lsum[r]", 2)}
                            if {qrow} < {Sq}:
                                for n in T.unroll({ND}):
                                    for e in T.unroll(2):
                                        {out_idx} = T.Cast("{spec.o_dtype}", o[n * 4 + r * 2 + e] / lsum[r])
"""
    src = _subst(src, {"b": f"by // {H}", "h": f"by % {H}", "q0": f"bx * {BR}", "k0": f"kb_ * {BC}"})
    return _parse(src)


# ---------------------------------------------------------------------------------------------------------------
# CUDA, fp16 on tensor cores, short sequences: K and V of a head resident in shared memory
#
# Why a second kernel (MiniLM fp16, batch 32, seq 128, 12 heads, dh 32 on the H100: the streaming kernel above took
# 20.5 us per layer for ~4 us of DRAM traffic). Read from its SASS (ptxas -v, nvdisasm): 83 registers x 64 threads
# let 11 of its 2-warp blocks onto an SM, so its 1536 blocks ran as 1.06 waves (a nearly empty second wave of
# whole block latencies); every block re-read all of K/V (4 blocks per head: 4x the K/V traffic) through registers
# into shared memory, in serial phases (load Q, sync, load K/V, sync, compute, sync, ...); each V fragment was 4
# 2-byte shared loads; the output went out as 2-byte stores. Here:
#   * one block per (batch x head, group of W query tiles of 16 rows), W up to 8: all of the head's keys and values
#     are copied ONCE per block into shared memory with 16-byte cp.async, one commit group per chunk of BC = 64 keys
#     (measured on the H100 at batch 32: 7.5 us per layer with 64, 8.7 with 32, 9.5 with 16; 8 vs 4 warps per block
#     the same, 2 warps 11.8), so
#     the first chunk's scores start while the later chunks are still in flight (one __syncthreads per chunk, none
#     after the last: nothing is overwritten);
#   * Q's A fragments come straight from global memory into registers (no shared round trip, no sync);
#   * K and V fragments by ldmatrix.x4 (V with .trans): one instruction per two mma operands;
#   * a mask that does not depend on the query row (a key-padding mask [B, 1, 1, S]) is copied with the chunk's
#     K/V into shared memory (cp.async, when its row is a multiple of 16 bytes; else read once per lane and chunk
#     into registers), not read per score element from global memory (MiniLM's [B, 1, S, S] mask: 13.7 us vs
#     8.7 us per layer with it narrowed, ember.passes.attention_mask);
#   * output stores as half2 (2 adjacent columns of the accumulator fragment).
# Shared memory: 2 x SKP x (D + 8) halves (rows padded by 16 bytes: the 8 row addresses of an ldmatrix phase hit
# distinct banks); the kernel is used when that fits in RESIDENT_SMEM_BYTES (static shared memory stays < 48 KiB).
RESIDENT_SMEM_BYTES = 40 * 1024
RESIDENT_CHUNK = 64  # keys per cp.async group and online-softmax step: measured 7.5 us vs 8.7 (32) and 9.5 (16) at b32
RESIDENT_WARPS_PER_SM = 24
_SMS = 132  # H100 SXM; only used to pick the block size (small grids: fewer warps per block, more blocks)

_LDSM_CUDA = ldmatrix_x4_source("ember_attn_ldsm_x4")
_LDSM_T_CUDA = ldmatrix_x4_source("ember_attn_ldsm_x4_t", transpose=True)
_CP16_CUDA = cp_async16_source("ember_attn_cp16")
# 4 bytes (2 halves of an A fragment) from global memory into a local array declared as halves: a vectorized TIR
# store would declare the array half2, and the mma's offsets (in halves) would then index it in half2 units
_LD32_CUDA = r"""
__forceinline__ __device__ void ember_attn_ld32(void* dst, const void* dst_last, const void* gmem) {
  *(unsigned int*)dst = __ldg((const unsigned int*)gmem);
}
"""
_COMMIT_CUDA = cp_async_commit_source("ember_attn_cp_commit")
# wait_group takes an immediate: the switch folds once the (unrolled) call has a constant argument
_WAIT_CUDA = cp_async_wait_source("ember_attn_cp_wait", 7)


def _resident_layout(spec: AttentionSpec, chunk: int = RESIDENT_CHUNK) -> tuple[int, int, int]:
    """(BC, NKB, smem bytes) of the resident kernel for ``spec``: chunks of BC keys (a multiple of 16)."""
    bc = min(chunk, -(-spec.kv_len // 16) * 16)
    nkb = -(-spec.kv_len // bc)
    return bc, nkb, 2 * nkb * bc * (spec.head_dim + 8) * 2


def resident_eligible(spec: AttentionSpec) -> bool:
    """Tensor-core eligible and K + V of one head fit in shared memory (:data:`RESIDENT_SMEM_BYTES`)."""
    bc, nkb, smem = _resident_layout(spec)
    return tensor_core_eligible(spec) and smem <= RESIDENT_SMEM_BYTES and nkb <= 8


def _resident_warps(spec: AttentionSpec) -> int:
    """Query tiles (warps) per block: up to 8, fewer while the grid would leave SMs idle (batch 1: 12 heads x 8
    tiles of a 128-token sequence are 96 one-warp blocks instead of 12 eight-warp ones)."""
    tiles = -(-spec.q_len // 16)
    w = min(8, 1 << (tiles - 1).bit_length())
    if spec.batch is not None:
        while w > 1 and -(-tiles // w) * spec.batch * spec.heads < 2 * _SMS:
            w //= 2
    return w


def cuda_attention_tc_resident(spec: AttentionSpec, warps: int | None = None,
                               chunk: int = RESIDENT_CHUNK) -> tvm.tirx.PrimFunc:
    """fp16 attention on tensor cores with the head's K and V resident in shared memory (see the comment above);
    same math, fragment layouts and online softmax as :func:`cuda_attention_tc`."""
    if not resident_eligible(spec):
        raise ValueError(f"cuda_attention_tc_resident: {spec} is not eligible (tensor-core eligible and K/V of a "
                         f"head within {RESIDENT_SMEM_BYTES} bytes of shared memory)")
    from tvm.backend.cuda.op import cuda_func_call
    from tvm.script import from_source
    from tvm.script import tirx as T

    D, Sq, Sk, H = spec.head_dim, spec.q_len, spec.kv_len, spec.heads
    W = warps or _resident_warps(spec)
    NT = 32 * W
    BC, NKB, smem = _resident_layout(spec, chunk)
    if smem > RESIDENT_SMEM_BYTES or BC % 16 or NKB > 8:
        raise ValueError(f"cuda_attention_tc_resident: chunk {chunk} does not fit {spec}")
    SKP, LD = NKB * BC, D + 8
    NQB = (Sq + 16 * W - 1) // (16 * W)
    # 24 warps per SM: ptxas keeps the kernel within 80 registers (it took 98-99 unbounded, so only 2 blocks of 8
    # warps fit an SM and MiniLM's 384 blocks at batch 32 ran as 1.45 waves)
    # (head dim 64 / 128: the output accumulator alone is 32 / 64 registers: 16 / 8 warps per SM)
    MINB = max(1, (RESIDENT_WARPS_PER_SM if D <= 32 else 16 if D <= 64 else 8) // W)
    FD, NC, ND, FC = D // 16, BC // 8, D // 8, BC // 16
    batch = "B" if spec.batch is None else str(spec.batch)
    params, header = _signature(spec)
    reads, writes = _regions(spec)
    f32 = "\"float32\""
    qrow = "q0 + ty * 16 + tx // 4 + r * 8"
    kcol = "k0 + j * 8 + tx % 4 * 2 + e"
    # a mask that does not vary along the query rows is loaded once per chunk into mk (float2 when the pair of
    # columns 2t, 2t + 1 is always in bounds together: an even key count)
    row_invariant = spec.mask_shape is not None and spec.mask_shape[2] == 1
    pair = Sk % 2 == 0
    mk_load, ms_copy = "", ""
    score = f"s[j * 4 + r * 2 + e] * T.float32({spec.scale * _LOG2E!r})"
    mbytes = 2 if spec.mask_dtype == "float16" else 4 if spec.mask_dtype == "float32" else 0
    if row_invariant and spec.mask_shape[3] != 1 and mbytes and (Sk * mbytes) % 16 == 0:
        # the mask row goes to shared memory with the chunk's K/V (cp.async, same group): read per score from
        # shared, nothing held in registers across the waits (with the row in registers: 99 registers, spills)
        per16 = 16 // mbytes
        pieces = BC // per16
        e_ = "(ty * 32 + tx)"
        col = f"c * {BC} + {e_} * {per16}"
        ms_copy = (f"if {e_} < {pieces} and {col} < {Sk}:\n"
                   f"    T.evaluate(cp16(T.address_of(Ms[{col}]), T.address_of(Ms[{col} + {per16 - 1}]), "
                   f"T.address_of({_mask_index(spec, 'b', 'h', '0', col)})))")
        score += f" + T.Cast({f32}, Ms[{kcol}]) * T.float32({_LOG2E!r})"
    elif row_invariant:
        if pair:
            col = f"T.min(k0 + j * 8 + tx % 4 * 2, {Sk - 2}) + e"
            mk_load = (f"for j in T.unroll({NC}):\n"
                       f"    for e in T.vectorized(2):\n"
                       f"        mk[j * 2 + e] = T.Cast({f32}, {_mask_index(spec, 'b', 'h', '0', col)})")
        else:
            mk_load = (f"for j in T.unroll({NC}):\n"
                       f"    for e in T.unroll(2):\n"
                       f"        mk[j * 2 + e] = T.Cast({f32}, "
                       f"{_mask_index(spec, 'b', 'h', '0', f'T.min({kcol}, {Sk - 1})')})")
        score += f" + mk[j * 2 + e] * T.float32({_LOG2E!r})"
    elif spec.mask_shape is not None:
        mi = _mask_index(spec, "b", "h", f"T.min({qrow}, {Sq - 1})", f"T.min({kcol}, {Sk - 1})")
        score += f" + T.Cast({f32}, {mi}) * T.float32({_LOG2E!r})"
    if Sk % BC:
        score = f"T.if_then_else({kcol} < {Sk}, {score}, T.float32({_LOWEST!r}))"

    def indent(text: str, n: int) -> str:
        return ("\n" + " " * n).join(text.split("\n"))

    def copies(dst: str, src: str, layout: str) -> str:
        """dst rows c * BC .. + BC <- src rows (clamped to the last), 16 bytes per thread and step, by cp.async."""
        per = BC * D // 8
        e = f"(it * {NT} + ty * 32 + tx)"
        guard = f"if {e} < {per}:" if per % NT else "if True:"
        row, col = f"(c * {BC} + {e} // {D // 8})", f"{e} % {D // 8} * 8"
        off = f"{row} * {LD} + {col}"
        return (f"for it in T.unroll({(per + NT - 1) // NT}):\n"
                f"    {guard}\n"
                f"        T.evaluate(cp16(T.address_of({dst}[{off}]), T.address_of({dst}[{off} + 7]), "
                f"T.address_of({_index(src, layout, 'b', 'h', f'T.min({row}, {Sk - 1})', col)})))")


    # ldmatrix.x4 row addresses, lane l -> matrix l // 8, row l % 8.
    # K (scores, B operand "col": lane (g, t) needs K[key g][dims 2t, 2t+1 (+8)]): matrices (tile j, dims +0),
    # (tile j, dims +8), (tile j + 1, dims +0), (tile j + 1, dims +8) -> kb[0:2], kb[2:4] (tile j), kb[4:8] (j + 1)
    k_addr = f"(k0 + (j2 * 2 + tx // 16) * 8 + tx % 8) * {LD} + kk * 16 + tx // 8 % 2 * 8"
    # V (values, B operand: lane (g, t) needs V[keys 2t, 2t+1 (+8)][dim g]: .trans): matrices (keys +0, dims n),
    # (keys +8, dims n), (keys +0, dims n + 1), (keys +8, dims n + 1)
    v_addr = f"(k0 + kk * 16 + tx // 8 % 2 * 8 + tx % 8) * {LD} + (n2 * 2 + tx // 16) * 8"
    out_idx = _index("O", spec.out_layout, "b", "h", qrow, "n * 8 + tx % 4 * 2 + e")
    p_lo, pv_lo = "", ""
    if spec.exact_p:
        p_lo = ("\n" + " " * 36 + "pl[i] = T.Cast(\"float16\", s[(kk * 2 + i // 4) * 4 + i % 4] - "
                "T.Cast(\"float32\", pa[i]))")
        pv_lo = ("\n" + " " * 36 + _mma_text("pl", "0", "vb", "0", "o", "n2 * 8") + "\n" + " " * 36
                 + _mma_text("pl", "0", "vb", "4", "o", "n2 * 8 + 4"))
    pad = 24
    src = f"""
@T.prim_func(s_tir=True)
def main({params}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{header}
    for bx in T.thread_binding({NQB}, thread="blockIdx.x"):
        for by in T.thread_binding({batch} * {H}, thread="blockIdx.y"):
            for ty in T.thread_binding({W}, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                  with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", {MINB}):
                    with T.sblock("flash_attention_resident"):
                        {reads}
                        {writes}
                        Ks = T.alloc_buffer(({SKP * LD},), "float16", scope="shared")
                        Vs = T.alloc_buffer(({SKP * LD},), "float16", scope="shared")
                        qa = T.alloc_buffer(({FD * 8},), "float16", scope="local")
                        pa = T.alloc_buffer((8,), "float16", scope="local")
                        pl = T.alloc_buffer((8,), "float16", scope="local")
                        kb = T.alloc_buffer((8,), "float16", scope="local")
                        vb = T.alloc_buffer((8,), "float16", scope="local")
                        mk = T.alloc_buffer(({NC * 2},), "float32", scope="local")
                        Ms = T.alloc_buffer(({SKP},), "{spec.mask_dtype}", scope="shared")
                        s = T.alloc_buffer(({NC * 4},), "float32", scope="local")
                        o = T.alloc_buffer(({ND * 4},), "float32", scope="local")
                        m = T.alloc_buffer((2,), "float32", scope="local")
                        lsum = T.alloc_buffer((2,), "float32", scope="local")
                        al = T.alloc_buffer((2,), "float32", scope="local")
                        mo = T.alloc_buffer((2,), "float32", scope="local")
                        for c in T.unroll({NKB}):
                            {indent(copies("Ks", "K", spec.k_layout), pad + 4)}
                            {indent(copies("Vs", "V", spec.v_layout), pad + 4)}
                            {indent(ms_copy, pad + 4)}
                            T.evaluate(cp_commit())
                        for kk in T.unroll({FD}):
                            for i in T.unroll(4):
                                T.evaluate(ld32(T.address_of(qa[kk * 8 + i * 2]), T.address_of(qa[kk * 8 + i * 2 + 1]), T.address_of({_index("Q", spec.q_layout, "b", "h", f"T.min(q0 + ty * 16 + tx // 4 + i % 2 * 8, {Sq - 1})", "kk * 16 + tx % 4 * 2 + i // 2 * 8")})))
                        for i in T.unroll({ND * 4}):
                            o[i] = T.float32(0)
                        for r in T.unroll(2):
                            m[r] = T.float32({_LOWEST!r})
                            lsum[r] = T.float32(0)
                        for kb_ in T.unroll({NKB}):
                            {indent(mk_load, pad + 4)}
                            T.evaluate(cp_wait({NKB - 1} - kb_))
                            T.tvm_storage_sync("shared")
                            for i in T.unroll({NC * 4}):
                                s[i] = T.float32(0)
                            for j2 in T.unroll({NC // 2}):
                                for kk in T.unroll({FD}):
                                    T.evaluate(ldsm(T.address_of(kb[0]), T.address_of(Ks[{SKP * LD - 1}]), T.address_of(Ks[{k_addr}])))
                                    {_mma_text("qa", "kk * 8", "kb", "0", "s", "j2 * 8")}
                                    {_mma_text("qa", "kk * 8", "kb", "4", "s", "j2 * 8 + 4")}
{_online_softmax_text(NC, ND, score)}
                            for kk in T.unroll({FC}):
                                for i in T.unroll(8):
                                    pa[i] = T.Cast("float16", s[(kk * 2 + i // 4) * 4 + i % 4]){p_lo}
                                for n2 in T.unroll({ND // 2}):
                                    T.evaluate(ldsm_t(T.address_of(vb[0]), T.address_of(Vs[{SKP * LD - 1}]), T.address_of(Vs[{v_addr}])))
                                    {_mma_text("pa", "0", "vb", "0", "o", "n2 * 8")}
                                    {_mma_text("pa", "0", "vb", "4", "o", "n2 * 8 + 4")}{pv_lo}
                        for r in T.unroll(2):
                            lsum[r] = lsum[r] + {_shfl_text("lsum[r]", 1)}
                            lsum[r] = lsum[r] + {_shfl_text("lsum[r]", 2)}
                            lsum[r] = T.float32(1) / lsum[r]
                            if {qrow} < {Sq}:
                                for n in T.unroll({ND}):
                                    for e in T.vectorized(2):
                                        {out_idx} = T.Cast("{spec.o_dtype}", o[n * 4 + r * 2 + e] * lsum[r])
"""
    src = _subst(src, {"b": f"by // {H}", "h": f"by % {H}", "q0": f"bx * {16 * W}", "k0": f"kb_ * {BC}"})
    helpers = {
        "T": T,
        "cp16": lambda d, last, s_: cuda_func_call("ember_attn_cp16", d, last, s_, source_code=_CP16_CUDA),
        "ld32": lambda d, last, s_: cuda_func_call("ember_attn_ld32", d, last, s_, source_code=_LD32_CUDA),
        "cp_commit": lambda: cuda_func_call("ember_attn_cp_commit", source_code=_COMMIT_CUDA),
        "cp_wait": lambda n: cuda_func_call("ember_attn_cp_wait", n, source_code=_WAIT_CUDA),
        "ldsm": lambda d, last, s_: cuda_func_call("ember_attn_ldsm_x4", d, last, s_, source_code=_LDSM_CUDA),
        "ldsm_t": lambda d, last, s_: cuda_func_call("ember_attn_ldsm_x4_t", d, last, s_, source_code=_LDSM_T_CUDA),
    }
    func = from_source(src, extra_vars=helpers)
    return func["main"] if isinstance(func, tvm.IRModule) else func


# Off: every fp16 tensor-core site gets the streaming kernel (the before/after switch of the benchmarks)
RESIDENT = True


def _fills_gpu(spec: AttentionSpec) -> bool:
    """At least one 8-warp block of work per SM (a symbolic batch counts as large)."""
    return spec.batch is None or spec.batch * spec.heads * -(-spec.q_len // 128) >= _SMS


def cuda_attention_tensor_cores(spec: AttentionSpec) -> tvm.tirx.PrimFunc:
    """The tensor-core kernel for ``spec``: K/V resident in shared memory when they fit (short sequences,
    :func:`resident_eligible`) and the grid fills the GPU, else the streaming :func:`cuda_attention_tc`.

    Why not at batch 1 (H100, MiniLM fp16, BENCHMARKS.md "Attention at batch 32"): there the resident kernel is
    faster alone (3.0 vs 4.6 us per layer) but the model was slower with it in both runs (0.243 / 0.248 ms vs
    0.232 / 0.229 ms with the streaming kernel; the GEMMs after it took 6 us more in the profile). Not understood;
    measured, so batch-1-sized grids keep the streaming kernel."""
    if RESIDENT and resident_eligible(spec) and _fills_gpu(spec):
        return cuda_attention_tc_resident(spec)
    return cuda_attention_tc(spec)
