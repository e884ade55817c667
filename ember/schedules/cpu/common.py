"""Helpers shared by ember's CPU schedule rules: target facts and small TIR analyses.

Nothing here hard-codes an ISA. The vector width comes from LLVM's view of the target (``-mcpu``/``-mattr``),
the core count from the target's ``num-cores``, so the same rule emits AVX2 code on a Zen 3 and AVX-512 code on
a Cascade Lake, and ``host`` never gets instructions the machine lacks.
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.target import Target

# TVM 0.27 models TIR calls as ``tvm.ir.expr.Call`` (there is no ``tirx.Call`` class to match on).
_CALL = type(tirx.exp(tirx.Var("_probe", "float32")))

_FALLBACK_VECTOR_BITS = 128  # SSE2 / NEON: what every x86-64 and AArch64 CPU has.


def is_cpu(target: Target) -> bool:
    return target is not None and target.kind.name == "llvm"


@functools.lru_cache(maxsize=64)
def _vector_bits_cached(target_str: str) -> int:
    # Ask LLVM which ISA features the target's -mcpu/-mattr enable. (llvm_get_vector_width is not used: in TVM
    # 0.27 it answers 512 for every x86 CPU, AVX2-only Zen 3 included, which would size register tiles for
    # registers the machine does not have.)
    from tvm.target.codegen import target_has_features

    target = Target(target_str)

    def has(feature: str) -> bool:
        try:
            return bool(target_has_features(feature, target))
        except Exception:  # pylint: disable=broad-except
            return False

    if has("avx512f"):
        return 512
    if has("avx"):
        return 256
    return _FALLBACK_VECTOR_BITS


def vector_bits(target: Target) -> int:
    """Width of one SIMD register in bits as LLVM sees the target (256 on AVX2, 512 on AVX-512)."""
    return _vector_bits_cached(str(target))


def vector_lanes(target: Target, dtype: str) -> int:
    """How many ``dtype`` elements fit one SIMD register (at least 1)."""
    bits = tvm.DataType(dtype).bits
    return max(vector_bits(target) // max(bits, 8), 1)


def num_vector_registers(target: Target) -> int:
    """x86-64 has 16 vector registers, 32 with AVX-512; AArch64 has 32."""
    triple = str(target.attrs.get("mtriple", "") or "")
    if vector_bits(target) >= 512 or triple.startswith(("aarch64", "arm64")):
        return 32
    return 16


def num_cores(target: Target) -> int:
    n = target.attrs.get("num-cores", None)
    try:
        n = int(n) if n is not None else 0
    except (TypeError, ValueError):
        n = 0
    if n <= 0:
        import os

        n = os.cpu_count() or 1
    return n


def const_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    """The loop's trip count if it is a compile-time constant, else None (symbolic, e.g. a dynamic batch)."""
    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def vars_in(expr) -> set:
    """Every tirx.Var that occurs in ``expr`` (a PrimExpr or a list of them)."""
    found = set()

    def _visit(node):
        if isinstance(node, tirx.Var):
            found.add(node)

    exprs = expr if isinstance(expr, (list, tuple)) else [expr]
    for e in exprs:
        tvm_ffi.structural_walk(e, (tirx.Var, _visit), order="post")
    return found


def has_if_then_else(sch: s_tir.Schedule, block_rv) -> bool:
    """Whether the block's body selects between values (padding, masking): such a block is costly to inline into
    a hot inner loop, because the branch would run once per multiply-add."""
    found = [False]

    def _select(_node):
        found[0] = True

    def _call(node):
        if "if_then_else" in str(getattr(node.op, "name", "")):
            found[0] = True

    tvm_ffi.structural_walk(sch.get(block_rv).body, [(tirx.Select, _select), (_CALL, _call)], order="post")
    return found[0]


def vectorize_innermost(sch: s_tir.Schedule, block_rv, lanes: int, max_unroll: int = 1) -> None:
    """Vectorize the block's innermost loop with ``lanes``.

    A constant extent that is a multiple of ``lanes`` is split exactly (no tail); a smaller constant extent is
    vectorized whole when that is at least 2 lanes; a symbolic or non-multiple extent is left scalar rather
    than split with a predicate, because TVM scalarizes predicated vector bodies anyway and the split would only
    add a branch. ``max_unroll`` > 1 additionally unrolls that many vectors (helps latency-bound loops).
    """
    loops = sch.get_loops(block_rv)
    if not loops:
        return
    inner = loops[-1]
    ext = const_extent(sch, inner)
    if ext is None or ext < 2:
        return
    if ext % lanes == 0:
        if ext == lanes:
            sch.vectorize(inner)
            return
        outer, vec = sch.split(inner, factors=[None, lanes])
        sch.vectorize(vec)
        if max_unroll > 1 and (ext // lanes) <= max_unroll:
            sch.unroll(outer)
    elif ext < lanes and ext in (2, 4, 8, 16):
        sch.vectorize(inner)


def is_unit_or_same(a, b) -> bool:
    return a.same_as(b)
