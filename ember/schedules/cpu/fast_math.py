"""Vectorizable float32 ``exp`` / ``erf`` / ``tanh`` for CPU kernels.

Why
---
LLVM lowers ``tirx.exp`` / ``tirx.erf`` / ``tirx.tanh`` to calls of the C library (``expf``, ``erff``, ``tanhf``),
one call per element even inside a vectorized loop: a MiniLM forward spent more time in GELU's ``erf`` and
softmax's ``exp`` than in all of its attention matmuls. ``rewrite_transcendentals(func)`` replaces each float32
call by the same function built from multiply-adds, a division and exponent-bit arithmetic, which LLVM turns
into AVX-512 / AVX2 / NEON vector code like any other arithmetic.

Accuracy (measured in tests/schedules/test_cpu_fast_math.py against numpy in float64):

* ``exp``: range reduction ``x = n ln2 + r`` (Cody-Waite, two-part ln2), degree-7 Taylor polynomial for
  ``e^r`` on ``|r| <= ln2/2`` (truncation < 6e-9), scale by ``2^n`` through the exponent bits; relative error
  a few ulp. Where e^x < 2.3e-38 (x < -86.64) it returns 0 (``expf`` gives a tiny or denormal value there),
  above FLT_MAX ``inf``; NaN passes through.
* ``erf``: Abramowitz & Stegun 7.1.26 (``1 - poly(t) e^{-x^2}``, ``t = 1 / (1 + p|x|)``), max absolute error
  1.5e-7, about one float32 ulp near 1, and its Taylor series below |x| < 0.25; odd symmetry by the sign.
* ``tanh``: ``1 - 2 / (e^{2|x|} + 1)`` with the sign restored, and its Taylor series (to x^9) below |x| < 0.25
  where that subtraction would lose digits; absolute error ~1e-7, relative ~3e-7 near 0.

Other dtypes (float16, float64) are left to LLVM: only float32 calls are rewritten.
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import tirx

_F32 = "float32"
# TVM 0.27 models TIR calls as ``tvm.ir.expr.Call`` (there is no ``tirx.Call`` class to match on).
_CALL = type(tirx.exp(tirx.Var("_probe", "float32")))

# e^x overflows float32 above ln(FLT_MAX). Below _EXP_LO (e^x < 2.3e-38, the bottom of the normal range) the
# result is flushed to 0: producing a denormal would cost a microcode assist per element on Intel CPUs, and
# softmax feeds exactly such inputs (masked scores of -3.4e38).
_EXP_HI = 88.72283172607422
_EXP_LO = -86.64
_LN2_HI = 0.693145751953125  # ln 2 split so n * _LN2_HI is exact in float32 for |n| <= 256 (Cody-Waite)
_LN2_LO = 1.428606765330187e-06
_LOG2E = 1.4426950408889634

# Abramowitz & Stegun, Handbook of Mathematical Functions, formula 7.1.26.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


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


def _pow2(n):
    """2^n for an integer-valued float32 n in [-126, 127], built from its exponent bits."""
    bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return tirx.reinterpret(_F32, bits)


def _exp(x):
    xc = tirx.Min(tirx.Max(x, _c(_EXP_LO)), _c(_EXP_HI))
    n = tirx.floor(xc * _c(_LOG2E) + _c(0.5))  # n in [-125, 128]
    r = xc - n * _c(_LN2_HI) - n * _c(_LN2_LO)
    poly = _horner(r, [1.0 / math.factorial(k) for k in range(8)])  # e^r in [0.70, 1.42]
    # e^x = (2 e^r) 2^(n-1): n-1 fits the exponent field for every n, and 2 e^r >= 1.41 keeps the product
    # normal at the bottom; at the top it overflows to inf exactly where e^x exceeds FLT_MAX.
    y = (poly * _c(2.0)) * _pow2(n - _c(1.0))
    y = tirx.Select(x < _c(_EXP_LO), _c(0.0), y)
    y = tirx.Select(x > _c(_EXP_HI), _c(float("inf")), y)
    return tirx.Select(_isnan(x), x, y)  # NaN in, NaN out


def _isnan(x):
    """``x`` is a NaN, from its bits (exponent all ones, mantissa not 0). Not ``tirx.isnan``: LLVM splits every
    16-lane vector of an expression holding TVM's isnan into two 8-lane halves on AVX-512 (the whole exp ran at
    half width); not ``x != x`` either, which TVM's simplifier folds to false."""
    bits = tirx.bitwise_and(tirx.reinterpret("int32", x), tirx.const(0x7FFFFFFF, "int32"))
    return bits > tirx.const(0x7F800000, "int32")


def fast_erf(x):
    """float32 erf(x) as a vectorizable expression (A&S 7.1.26, see module docstring)."""
    return _bind(x, _erf)


def _erf(x):
    ax = tirx.Max(x, -x)
    t = _c(1.0) / (_c(1.0) + _c(_AS_P) * ax)
    poly = t * _horner(t, list(_AS_A))
    y = _c(1.0) - poly * fast_exp(-(ax * ax))
    # (each Let may occur once in the tree: bind y before using it in both branches)
    y = _bind(y, lambda yv: tirx.Select(x < _c(0.0), -yv, yv))
    # Near 0, 1 - poly e^{-x^2} cancels to a few correct digits; the Taylor series of erf is exact there.
    x2 = x * x
    small = x * _horner(x2, [c * 2.0 / math.sqrt(math.pi) for c in (1.0, -1.0 / 3, 1.0 / 10, -1.0 / 42, 1.0 / 216)])
    return tirx.Select(ax < _c(0.25), small, y)


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


_REWRITES = {"tirx.exp": fast_exp, "tirx.erf": fast_erf, "tirx.tanh": fast_tanh}


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
