"""ember.schedules.cpu.fast_math: the vectorizable exp/erf/tanh are accurate (vs float64 numpy/math), keep the
special values, really replace the libm calls in compiled CPU code, and leave other dtypes alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import s_tir, te, tirx

from ember.schedules import schedule_pass
from ember.schedules.cpu.fast_math import rewrite_transcendentals, uses_transcendentals
from helpers import host_target, vector_lanes

TARGET = host_target()
FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)


def _unary(name: str, n: int, dtype="float32"):
    a = te.placeholder((n,), dtype, name="A")
    b = te.compute((n,), lambda i: getattr(te, name)(a[i]), name="B")
    return te.create_prim_func([a, b])


def _vectorized(func):
    sch = s_tir.Schedule(func)
    (loop,) = sch.get_loops(sch.get_sblock("B"))
    _, inner = sch.split(loop, [None, vector_lanes(TARGET)])
    sch.vectorize(inner)
    return sch.mod["main"]


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)


def _run(func, x):
    ex = _build(func)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full_like(x, np.nan), dev)
    ex["main"](tvm.runtime.tensor(x, dev), out)
    return out.numpy()


def _inputs(n_random=1 << 16):
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 1e-6, -1e-6, 1e-30, 0.03, -0.03, 0.25, -0.25, 0.5, 1.0, -1.0, 3.9, -3.9, 10.0, -10.0,
                80.0, 88.7, 88.8, -86.0, -87.5, -104.0, -3.4e38, 3.4e38, np.inf, -np.inf, np.nan]
    body = np.concatenate([rng.standard_normal(n_random) * 3, rng.uniform(-110, 95, n_random)])
    # an odd length, so the vector loop has a tail too
    return np.concatenate([np.array(specials), body, [0.7]]).astype("float32")


REFS = {"exp": np.exp, "tanh": np.tanh, "erf": np.vectorize(math.erf, otypes=[np.float64])}


@pytest.mark.parametrize("name", ["exp", "erf", "tanh"])
def test_accuracy_and_specials(name):
    x = _inputs()
    func = _unary(name, len(x))
    fast = rewrite_transcendentals(func)
    assert not uses_transcendentals(fast), "the libm call is still there"
    got = _run(_vectorized(fast), x).astype(np.float64)
    with np.errstate(over="ignore"):
        ref = REFS[name](x.astype(np.float64))
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all(), "NaN must pass through"
    ok = ~nan
    if name == "exp":
        normal = ok & (ref >= 2.4e-38) & (ref <= FLT_MAX)
        rel = np.abs(got[normal] - ref[normal]) / ref[normal]
        assert rel.max() < 4e-7, f"exp max relative error {rel.max():.3g}"
        assert (got[ok & (ref > FLT_MAX * 1.0001)] == np.inf).all()
        # below the normal range the result is flushed to zero, never garbage
        tiny = ok & (ref < 2.4e-38)
        assert (got[tiny] >= 0).all() and (got[tiny] <= 2.4e-38).all()
    else:
        err = np.abs(got[ok] - ref[ok])
        bound = 4e-7 if name == "erf" else 3e-7
        assert err.max() < bound, f"{name} max abs error {err.max():.3g}"
        # odd functions: exact symmetry, and the small-argument branch keeps relative accuracy
        small = ok & (np.abs(x) > 0) & (np.abs(x) < 0.2)
        assert (np.abs(got[small] - ref[small]) / np.abs(ref[small])).max() < 1e-6
        assert (got[x == np.inf] == 1).all() and (got[x == -np.inf] == -1).all()


def test_other_dtypes_are_left_alone():
    func = _unary("exp", 64, "float64")
    assert rewrite_transcendentals(func).same_as(func)


def test_float32_calls_counted():
    assert uses_transcendentals(_unary("erf", 8))
    assert not uses_transcendentals(_unary("sqrt", 8))


def test_schedule_pass_removes_libm_calls():
    """Through ember's schedule pass (what ember.compile runs), the compiled code calls no expf/erff."""
    from tvm import relax

    from helpers import relax_graph

    mod = relax_graph([("x", (8, 64))], lambda x: relax.op.nn.gelu(relax.op.nn.softmax(x, axis=-1)))
    seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR(),
                                    schedule_pass(TARGET)])
    mod = seq(mod)
    for _, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc):
            assert not uses_transcendentals(f)
    ex = tvm.compile(mod, TARGET)
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    for fn in ("expf", "erff", "tanhf"):
        assert f"call\t{fn}" not in asm and f"callq\t{fn}" not in asm and f"{fn}@PLT" not in asm
