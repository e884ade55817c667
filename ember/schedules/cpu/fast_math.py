"""Vectorizable float32 ``exp`` / ``erf`` / ``tanh`` for CPU kernels.

Why
---
LLVM lowers ``tirx.exp`` / ``tirx.erf`` / ``tirx.tanh`` to calls of the C library (``expf``, ``erff``, ``tanhf``),
one call per element even inside a vectorized loop: a MiniLM forward spent more time in GELU's ``erf`` and
softmax's ``exp`` than in all of its attention matmuls. ``rewrite_transcendentals(func)`` replaces each float32
call by the same function built from multiply-adds and exponent-bit arithmetic (tanh: and a division), which LLVM turns
into AVX-512 / AVX2 / NEON vector code like any other arithmetic.

Accuracy (measured in tests/schedules/test_cpu_fast_math.py against numpy in float64):

* ``exp``: range reduction ``x = n ln2 + r`` (Cody-Waite, two-part ln2), a degree-6 polynomial for ``e^r`` on
  ``|r| <= ln2/2`` (minimax in relative error, fitted in float64 and rounded to fp32: 1.7e-8 before the fp32
  rounding of its evaluation), scale by ``2^n`` through the exponent bits: 1.0 ulp max where e^x is normal (the
  degree-7 Taylor series it replaced: 0.9 ulp, one multiply-add more). Where e^x < 1.7e-38 (x < -86.99) it
  returns 0 (``expf`` gives a tiny or denormal value there), above FLT_MAX ``inf``; NaN passes through.
* ``exp2`` (:func:`fast_exp2`): the same with ``x = n + f``, ``|f| <= 1/2``, no Cody-Waite step (n is exact):
  0.9 ulp, 2^n exact; 0 below 2^-125.5, ``inf`` from 2^128. The rounding to n is done by the float adder (see
  _ROUND_MAGIC), which also yields 2^(n-1)'s bits.
* ``erf``: the branch-free fit of :mod:`ember.schedules.erf_fit`, shared with the Hopper GEMM's GELU epilogue:
  ``a + a P(a^2)`` below |x| < 0.92, ``1 - 2^(c Q(c) - c)`` above (c = min(|x|, 3.94)), the sign copied from x.
  Multiply-adds and one exp2, no division (A&S 7.1.26's ``1 / (1 + p|x|)`` was a ``vdivps`` per vector, and it
  needed a Taylor branch near 0 too): 1.0 ulp max from the exact erf over [-6, 6], tiny and denormal x included
  (the A&S form: 11.7 ulp, near its Taylor switch). 1.45x faster as a loop of its own on AVX-512 (exp: 1.46x), but
  only ~2% faster inside MiniLM's FFN-up + GELU kernel, whose per-tile epilogue is not bound by the erf's
  instruction count (same-process A/B of MiniLM b8 on the 2-core Xeon, 2026-11-26).
* ``tanh``: ``1 - 2 / (e^{2|x|} + 1)`` with the sign restored, and its Taylor series (to x^9) below |x| < 0.25
  where that subtraction would lose digits; absolute error ~1e-7, relative ~3e-7 near 0.

Other dtypes (float16, float64) are left to LLVM: only float32 calls are rewritten.
"""

from __future__ import annotations

import tvm_ffi
from tvm import tirx

from ..erf_fit import ERF_BIG, ERF_CLAMP, ERF_SMALL, ERF_SPLIT

_F32 = "float32"
# TVM 0.27 models TIR calls as ``tvm.ir.expr.Call`` (there is no ``tirx.Call`` class to match on).
_CALL = type(tirx.exp(tirx.Var("_probe", "float32")))

# The input clamp of exp keeps 2^(n-1) inside the exponent field (n in [-126, 128]) and lets the ends fall out of
# the arithmetic: at the top n = 128 and 2 e^r 2^127 overflows to inf by itself wherever e^x > FLT_MAX; at the
# bottom n = -126 makes the exponent field 0, i.e. +0.0, so e^x < 1.7e-38 (x < -86.99) flushes to 0 instead of
# producing a denormal, which would cost a microcode assist per element on Intel CPUs (softmax feeds exactly such
# inputs: masked scores of -3.4e38).
_EXP_HI = 88.75  # ln(FLT_MAX) = 88.7228; x * log2(e) stays below 128.5
_EXP_LO = -87.5  # x * log2(e) = -126.24: n = -126
_LN2_HI = 0.693145751953125  # ln 2 split so n * _LN2_HI is exact in float32 for |n| <= 256 (Cody-Waite)
_LN2_LO = 1.428606765330187e-06
_LOG2E = 1.4426950408889634
# e^r on |r| <= ln2/2 and 2^f on |f| <= 1/2: 1 + x (c1 + c2 x + ...), degree 6, minimax in relative error
# (Lawson-weighted least squares in float64, rounded to fp32; max relative error 1.7e-8 / 1.6e-8 before the fp32
# evaluation). They replace a degree-7 Taylor series: one multiply-add less per element, same accuracy.
_EXP_POLY = (1.0, 1.0, 0.4999999403953552, 0.16666431725025177, 0.04166800156235695, 0.00837415549904108,
             0.0013843647902831435)
_EXP2_POLY = (1.0, 0.6931471824645996, 0.24022647738456726, 0.055503323674201965, 0.009618437848985195,
              0.0013398875016719103, 0.00015353354683611542)
# Round to nearest with the float adder: for |v| < 2^21, t = v + _ROUND_MAGIC is an integer in [2^23, 2^24), so
# t's low mantissa bits hold n + 126 (n = round(v)) and t << 23 is already the bit pattern of 2^(n-1) (exponent
# field n + 126; the higher bits shift out), while t - _ROUND_MAGIC = n exactly. Two instructions instead of a
# round, a float-to-int conversion, a shift and an add. (It needs IEEE float arithmetic without reassociation, as
# Cody-Waite does: TVM's LLVM targets set no fast-math flags unless asked to.)
_ROUND_MAGIC = 12583038.0  # 1.5 * 2^23 + 126
_ROUND_MAGIC_BITS = 0x4B40007E
# fast_exp2's clamp: n = round(x) in [-126, 128], as for exp
_EXP2_HI = 128.0
_EXP2_LO = -126.5


def _c(v: float):
    return tirx.const(v, _F32)


def _bind(value, body_fn):
    """``body_fn(v)`` with ``v`` bound once to ``value`` (a Let), so an argument used several times in the
    expression is evaluated once; plain variables and constants are used directly."""
    if isinstance(value, (tirx.Var, tirx.FloatImm)):
        return body_fn(value)
    v = tirx.Var("fm_x", _F32)
    return tirx.Let(v, value, body_fn(v))


def _horner(x, coeffs):
    """coeffs[0] + x * (coeffs[1] + x * (...)), coefficients lowest degree first."""
    acc = _c(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + _c(c)
    return acc


def fast_exp(x):
    """float32 e^x as a vectorizable expression (see module docstring)."""
    return _bind(x, _exp)


def _rounded(t, body_fn):
    """``body_fn(n, half_pow2)`` for ``t = v + _ROUND_MAGIC`` (bound once): n = round(v) as a float and 2^(n-1)
    from t's bits, for n in [-126, 128]; 2^(n-1) is +0.0 at n = -126 (exponent field 0, mantissa 0). Half, so that
    n = 128 still fits the exponent field: callers multiply by 2 p."""
    def body(tv):
        # _ROUND_MAGIC as the float of its bits: a plain constant, and TVM's simplifier folds (v + M) - M to v
        n = tv - tirx.reinterpret(_F32, tirx.const(_ROUND_MAGIC_BITS, "int32"))
        half_pow2 = tirx.reinterpret(_F32, tirx.shift_left(tirx.reinterpret("int32", tv), tirx.const(23, "int32")))
        return body_fn(n, half_pow2)

    return _bind(t, body)


def _doubled(coeffs):
    # 2 p(x) with the factor folded into the coefficients (exact: a power of two)
    return [2.0 * c for c in coeffs]


def _exp(x):
    def reduced(xc):
        def scaled(n, half_pow2):  # n = round(xc log2 e) in [-126, 128]
            r = xc - n * _c(_LN2_HI) - n * _c(_LN2_LO)
            # e^x = (2 e^r) 2^(n-1), 2 e^r in [1.41, 2.83]: normal down to n = -125, 0 at n = -126, inf past FLT_MAX
            return _horner(r, _doubled(_EXP_POLY)) * half_pow2

        return _rounded(xc * _c(_LOG2E) + _c(_ROUND_MAGIC), scaled)

    y = _bind(tirx.Min(tirx.Max(x, _c(_EXP_LO)), _c(_EXP_HI)), reduced)
    return tirx.Select(_isnan(x), x, y)  # NaN in, NaN out (the clamps may have turned it into a number)


def _isnan(x):
    """``x`` is a NaN, from its bits (exponent all ones, mantissa not 0). Not ``tirx.isnan``: LLVM splits every
    16-lane vector of an expression holding TVM's isnan into two 8-lane halves on AVX-512 (the whole exp ran at
    half width); not ``x != x`` either, which TVM's simplifier folds to false."""
    bits = tirx.bitwise_and(tirx.reinterpret("int32", x), tirx.const(0x7FFFFFFF, "int32"))
    return bits > tirx.const(0x7F800000, "int32")


def fast_exp2(x):
    """float32 2^x as a vectorizable expression: 0 below 2^-125.5 (no denormals), inf from 2^128, NaN kept."""
    def clamped(v):
        return tirx.Select(_isnan(v), v, _exp2_in_range(tirx.Min(tirx.Max(v, _c(_EXP2_LO)), _c(_EXP2_HI))))

    return _bind(x, clamped)


def _exp2_in_range(x):
    """2^x for x in [-126.5, 128] (the caller's clamp or bound): x = n + f, |f| <= 1/2, (2 p(f)) 2^(n-1)."""
    def body(v):
        return _rounded(v + _c(_ROUND_MAGIC), lambda n, half_pow2: _horner(v - n, _doubled(_EXP2_POLY)) * half_pow2)

    return _bind(x, body)


def fast_erf(x):
    """float32 erf(x) as a vectorizable expression (the erf_fit polynomials, see module docstring)."""
    return _bind(x, _erf)


def _erf(x):
    a = tirx.Var("fm_a", _F32)
    c = tirx.Min(a, _c(ERF_CLAMP))
    # c Q(c) - c is in [-26, 0] for every c in [0, ERF_CLAMP] (erf_fit), so exp2 needs no clamp here. A NaN x
    # gives a NaN exponent, whose lanes the select below discards: it takes the small branch, which keeps the NaN.
    # (A degree-5 exp2 would do here, 1.2 instead of 1.04 ulp, one multiply-add less: it made MiniLM's FFN-up +
    # GELU kernel slower, not faster, in a same-process A/B on AVX-512.)
    big = _c(1.0) - _exp2_in_range(_horner(c, list(ERF_BIG)) * c - c)
    small = _horner(a * a, list(ERF_SMALL)) * a + a
    y = tirx.Select(a >= _c(ERF_SPLIT), big, small)
    # erf is odd: the sign bit of x onto y >= 0 (also makes erf(-0) = -0); |y| <= 1 everywhere, so +-inf give +-1
    return tirx.Let(a, tirx.abs(x), _with_sign_of(y, x))  # abs of a float: T.fabs


def _with_sign_of(y, x):
    """``y | sign bit of x`` for y >= 0 (or NaN): one or two bitwise ops. Not ``tirx.copysign``, which TVM's
    vectorizer cannot vectorize: it falls back to a scalar loop for the whole statement."""
    sign = tirx.bitwise_and(tirx.reinterpret("int32", x), tirx.const(-(1 << 31), "int32"))
    return tirx.reinterpret(_F32, tirx.bitwise_or(tirx.reinterpret("int32", y), sign))


def fast_tanh(x):
    """float32 tanh(x) as a vectorizable expression (see module docstring)."""
    return _bind(x, _tanh)


def _tanh(x):
    ax = tirx.Max(x, -x)
    big = _c(1.0) - _c(2.0) / (fast_exp(ax * _c(2.0)) + _c(1.0))
    x2 = x * x
    small = x * _horner(x2, [1.0, -1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0, 62.0 / 2835.0])
    y = _bind(big, lambda b: tirx.Select(x < _c(0.0), -b, b))
    return tirx.Select(ax < _c(0.25), small, y)


_REWRITES = {"tirx.exp": fast_exp, "tirx.exp2": fast_exp2, "tirx.erf": fast_erf, "tirx.tanh": fast_tanh}


def rewrite_transcendentals(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Replace every float32 exp/erf/tanh call in ``func`` by its vectorizable expression."""
    changed = [False]

    def _call(node):
        name = str(getattr(node.op, "name", ""))
        fn = _REWRITES.get(name)
        if fn is None or len(node.args) != 1 or str(node.ty) != _F32:
            return node
        changed[0] = True
        return fn(node.args[0])

    body = tvm_ffi.structural_map(func.body, [(_CALL, _call)], order="post")
    if not changed[0]:
        return func
    return func.with_body(body)


def uses_transcendentals(func: tirx.PrimFunc) -> bool:
    found = [False]

    def _call(node):
        if str(getattr(node.op, "name", "")) in _REWRITES and str(node.ty) == _F32:
            found[0] = True

    tvm_ffi.structural_walk(func.body, (_CALL, _call), order="post")
    return found[0]
