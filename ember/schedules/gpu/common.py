"""What ember's GPU rules share: which targets are GPUs, and the analysis that recognises a matmul kernel.

``analyze_matmul`` reads a fused kernel (as FuseTIR leaves it: maybe an injective producer such as a transpose or
a cast, one reduction block, maybe an injective epilogue such as bias add or a cast) and answers, for the
reduction ``C[b..., n...] += X[b..., k] * W[k, n...]`` (or ``W[n..., k]``):

* which read is the activation ``X`` (indexed by the "batch" iterators b and by k) and which is the weight ``W``
  (indexed by the "output column" iterators n and by k); iterators used by both (a true batched matmul) are
  not a GEMV or plain GEMM and make the analysis decline;
* the extents of b, n and k (``None`` when symbolic);
* whether ``W``'s contiguous (last) axis is k ("inner reduction") or n ("outer reduction").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.target import Target

GPU_KINDS = {"cuda", "rocm", "metal", "vulkan", "opencl", "webgpu"}


def is_gpu(target: Target | None) -> bool:
    return target is not None and target.kind.name in GPU_KINDS


def is_cuda(target: Target | None) -> bool:
    return target is not None and target.kind.name == "cuda"


def sm_version(target: Target) -> int:
    """``sm_90a`` -> 90. (dlight's own check reads ``sm_90a`` as -1 and so never uses tensor cores on Hopper.)"""
    arch = str(target.attrs.get("arch", "") or "")
    digits = "".join(ch for ch in arch.replace("sm_", "") if ch.isdigit())
    return int(digits) if digits else -1


def _vars_in(expr_list) -> set:
    out = set()
    for e in expr_list:
        out |= collect_vars_used_in_prim_expr(e)
    return out


def _static(extents) -> int | None:
    total = 1
    for e in extents:
        if isinstance(e, tirx.IntImm):
            e = int(e)
        if not isinstance(e, int):
            return None
        total *= e
    return total


@dataclass
class MatmulKernel:
    block: s_tir.schedule.SBlockRV
    epilogue: s_tir.schedule.SBlockRV | None
    act: tirx.Buffer
    weight: tirx.Buffer
    out: tirx.Buffer
    b_iters: list
    n_iters: list
    k_iter: object
    inner_reduction: bool
    batch: int | None
    n: int | None
    k: int | None

    @property
    def weight_dtype(self) -> str:
        return str(self.weight.dtype)

    @property
    def act_dtype(self) -> str:
        return str(self.act.dtype)

    @property
    def out_dtype(self) -> str:
        return str(self.out.dtype)

    def normalize_loops(self, sch: s_tir.Schedule):
        """Reorder the kernel's loops to (batch, n, k) and fuse each group: returns the three loops."""
        b_loops = [it.loop_rv for it in self.b_iters]
        n_loops = [it.loop_rv for it in self.n_iters]
        k_loop = self.k_iter.loop_rv
        if not b_loops:
            b_loops = [sch.add_unit_loop(self.block)]
        sch.reorder(*b_loops, *n_loops, k_loop)
        b = sch.fuse(*b_loops) if len(b_loops) > 1 else b_loops[0]
        n = sch.fuse(*n_loops) if len(n_loops) > 1 else n_loops[0]
        return b, n, k_loop


def analyze_matmul(sch: s_tir.Schedule) -> MatmulKernel | None:
    """Recognise ``C[b, n] (+)= X[b, k] * W[k|n, n|k]`` (see module doc); ``None`` for anything else.

    Mutates ``sch`` (inlines injective producers); callers discard the schedule when this returns ``None``.
    """
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline_contiguous_spatial(sch, infos)
    if infos is None or not infos or len(infos) > 2:
        return None
    main = infos[0]
    if not main.is_reduction():
        return None
    epilogue = None
    if len(infos) == 2:
        if not infos[1].is_injective():
            return None
        epilogue = infos[1].block_rv
    stmt = sch.get(main.block_rv)
    if len(stmt.writes) != 1:
        return None
    out = stmt.writes[0].source
    # The update must be a sum of products of two reads: C = C + X * W (possibly with casts around X and W).
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return None
    reads = [r for r in stmt.reads if not r.source.same_as(out)]
    if len(reads) != 2:
        return None
    r_iters = [it for it in main.iters if it.kind == "R"]
    s_iters = [it for it in main.iters if it.kind == "S"]
    if len(r_iters) != 1 or any(it.kind not in ("S", "R") for it in main.iters):
        return None
    k_iter = r_iters[0]
    used = [_vars_in([rng.min for rng in r.region]) for r in reads]
    if any(k_iter.var not in u for u in used):
        return None
    # Each spatial iterator indexes exactly one operand: the activation (batch rows) or the weight (columns).
    # Unit-extent iterators that index neither are harmless batch rows.
    sides: dict[int, list] = {0: [], 1: []}
    b_list = []
    for it in s_iters:
        in0, in1 = it.var in used[0], it.var in used[1]
        if in0 and in1:
            return None  # batched matmul (both operands share the iterator)
        if not in0 and not in1:
            if _static([it.dom]) == 1:
                b_list.append(it)
                continue
            return None
        sides[0 if in0 else 1].append(it)
    # The weight is the operand that k and the output columns index; with batch 1 the activation may have no
    # spatial iterator at all, so the weight is the side with more of them (ties: the larger buffer).
    if not sides[0] and not sides[1]:
        return None
    if bool(sides[0]) != bool(sides[1]):
        w_side = 0 if sides[0] else 1
    else:
        # Both operands have spatial iterators (a GEMM, or a GEMV with batch rows): the activation is the one
        # whose contiguous axis is k; if both are (NT GEMM), the larger buffer is the weight.
        k_last = [_vars_in([r.region[-1].min]) == {k_iter.var} for r in reads]
        if k_last[0] != k_last[1]:
            w_side = 1 if k_last[0] else 0
        else:
            size = [_static(r.source.shape) or 0 for r in reads]
            w_side = 0 if size[0] > size[1] else 1
    n_list = sides[w_side]
    b_list = b_list + sides[1 - w_side]
    act, weight = reads[1 - w_side].source, reads[w_side].source
    # The weight's contiguous axis: its last index uses k (inner reduction) or an n iterator (outer).
    last = reads[w_side].region[-1].min
    last_vars = _vars_in([last])
    if k_iter.var in last_vars and not last_vars & {it.var for it in n_list}:
        inner = True
    elif last_vars and last_vars <= {it.var for it in n_list}:
        inner = False
    else:
        return None
    # The activation's last index must be k for contiguous activation loads (X[b, k]).
    if _vars_in([reads[1 - w_side].region[-1].min]) != {k_iter.var}:
        return None
    # Loops must map one to one onto the block's iterators, in any order (no fused/split bindings).
    return MatmulKernel(block=main.block_rv, epilogue=epilogue, act=act, weight=weight, out=out,
                        b_iters=b_list, n_iters=n_list, k_iter=k_iter, inner_reduction=inner,
                        batch=_static([it.dom for it in b_list]), n=_static([it.dom for it in n_list]),
                        k=_static([k_iter.dom]))


@functools.lru_cache(maxsize=None)
def tensor_intrinsics_registered() -> bool:
    """Importing the module registers TVM's CUDA tensor intrinsics (wmma/mma) by name; slow the first time."""
    import tvm.s_tir.tensor_intrin.cuda  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

    return True
