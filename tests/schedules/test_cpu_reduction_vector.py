"""RowReduction's vectorized row reductions (layer norm, RMS norm, softmax): each row is reduced as vector
partial results, so the schedule must (a) really factor and vectorize the reduction, (b) agree with the
unscheduled kernel to fp32 rounding (the terms are added in another order, so not bit for bit) on random inputs
with NaN-prefilled outputs, for row lengths that are multiples of the vector, ragged (a predicated last step) and
prime, and (c) be caught by the checker when it is wrong."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.script import from_source

from ember.compiler.pipeline import fuse_pass
from ember.schedules.cpu import RowReduction
from helpers import (
    assert_close,
    assert_same_result,
    host_target,
    loop_kinds,
    random_args,
    relax_graph,
    run,
    the_kernel,
)

op = relax.op
TARGET = host_target()
# An AVX2-only x86 (8 fp32 lanes, the CI machine that was a Zen 3): its code runs on this AVX-512 machine too.
AVX2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2})
# fp32, rows of a few hundred terms summed in another order: a few ulp of the row's scale.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _apply(func, target=TARGET):
    with target:
        sch = RowReduction().apply(func, target, False)
    assert sch is not None, "RowReduction declined a row reduction"
    return sch.mod["main"]


def _factored(func) -> bool:
    """Whether the schedule split a reduction into vector partial results (rfactor's ``*_rf`` buffers)."""
    return "_rf" in func.script()


def layer_norm(shape, residual=False):
    d = shape[-1]
    if residual:
        mod = relax_graph([("x", shape), ("r", shape), ("g", (d,)), ("b", (d,))],
                          lambda x, r, g, b: op.nn.layer_norm(op.add(x, r), g, b, axes=[-1]))
        # ember's fusion (as in MiniLM: fused_relax_add_relax_nn_layer_norm), not TVM's FuseOps alone
        with TARGET:
            fused = fuse_pass(TARGET)(mod)
        hits = [f for gv, f in fused.functions.items()
                if isinstance(f, tirx.PrimFunc) and "layer_norm" in gv.name_hint]
        assert len(hits) == 1
        return hits[0]
    mod = relax_graph([("x", shape), ("g", (d,)), ("b", (d,))],
                      lambda x, g, b: op.nn.layer_norm(x, g, b, axes=[-1]))
    return the_kernel(mod, "layer_norm")


def softmax(shape, masked=False):
    if masked:
        mod = relax_graph([("s", shape), ("m", shape[-2:])], lambda s, m: op.nn.softmax(op.add(s, m), axis=-1))
    else:
        mod = relax_graph([("s", shape)], lambda s: op.nn.softmax(s, axis=-1))
    return the_kernel(mod, "softmax")


def rms_norm(shape):
    mod = relax_graph([("x", shape), ("g", shape[-1:])], lambda x, g: op.nn.rms_norm(x, g, axes=[-1]))
    return the_kernel(mod, "rms_norm")


@pytest.mark.parametrize("kernel", [
    pytest.param(lambda: layer_norm((1024, 384)), id="layer_norm-minilm-b8-rows"),
    pytest.param(lambda: layer_norm((2, 128, 384), residual=True), id="add-layer_norm-fused"),
    pytest.param(lambda: layer_norm((5, 33)), id="layer_norm-33-ragged"),
    pytest.param(lambda: layer_norm((7, 200)), id="layer_norm-200-ragged"),
    pytest.param(lambda: layer_norm((3, 131)), id="layer_norm-prime"),
    pytest.param(lambda: softmax((2, 4, 128, 128), masked=True), id="softmax-masked-128"),
    pytest.param(lambda: softmax((6, 77)), id="softmax-77"),
    pytest.param(lambda: rms_norm((9, 4096)), id="rms_norm-4096"),
])
@pytest.mark.parametrize("target", [TARGET, AVX2], ids=["host", "avx2"])
def test_row_reduction_is_vectorized_and_correct(kernel, target):
    func = kernel()
    sched = _apply(func, target)
    assert _factored(sched), "expected the row reduction to be split into vector partial results"
    assert tirx.ForKind.VECTORIZED in loop_kinds(sched)
    arrays = random_args(func, seed=1)
    expected = run(func, arrays, target=target)
    actual = run(sched, arrays, target=target)
    for e, a in zip(expected, actual):
        assert_close(a, e, **TOL)


def test_layer_norm_against_numpy_float64():
    """Against an independent reference too (not only the unscheduled TVM kernel): float64 numpy."""
    func = layer_norm((64, 384))
    x, g, b, out = random_args(func, seed=3)
    x = x * 4.0 + 3.0  # an offset mean, as a residual stream has
    (actual,) = run(_apply(func), [x, g, b, out])
    xd = x.astype(np.float64)
    mean = xd.mean(-1, keepdims=True)
    var = ((xd - mean) ** 2).mean(-1, keepdims=True)
    ref = (xd - mean) / np.sqrt(var + 1e-5) * g + b
    assert_close(actual, ref, **TOL)


@pytest.mark.parametrize("shape,env", [(("batch", 128, 384), {"batch": 3}), (("n", 77), {"n": 5})])
def test_symbolic_rows(shape, env):
    """A dynamic batch (ember.compile(dynamic_batch=True)): the rows are symbolic, the row length is not.
    Ragged rows stay serial there (see _vectorize_row_reduction: TVM's LoopPartition fails on them)."""
    func = layer_norm(shape)
    sched = _apply(func)
    assert _factored(sched) == (shape[-1] == 384)  # 77 is ragged for every vector width
    assert tirx.ForKind.PARALLEL in loop_kinds(sched)
    assert_same_result(func, sched, shape_vars=env, **TOL)


def test_big_row_reduction_stays_parallel():
    sched = _apply(layer_norm((1024, 384)))
    assert tirx.ForKind.PARALLEL in loop_kinds(sched)
    assert "pragma_loop_partition_hint" not in sched.script()  # 384 = 6 steps x 4 chains x 16 (or x 8) lanes


def test_ragged_rows_peel_the_last_step():
    sched = _apply(softmax((6, 77)))
    assert "pragma_loop_partition_hint" in sched.script()


def test_short_rows_stay_serial():
    """Rows shorter than two vectors keep the serial reduction (bit-identical)."""
    short = _apply(layer_norm((4, 12)))
    assert not _factored(short)
    assert_same_result(layer_norm((4, 12)), short, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(8, 128, 384), (2, 9, 48)])
def test_strided_sum_is_vectorized_over_outputs(shape):
    """MiniLM's mean pooling: a sum over the sequence of [batch, seq, hidden] reads its reduced axis with a
    stride, so it is vectorized over the hidden outputs (reduction loop outside), not factored into rows; each
    output still adds its terms in order: bit-identical."""
    func = the_kernel(relax_graph([("x", shape)], lambda x: op.sum(x, axis=[1])), "sum")
    sched = _apply(func)
    assert not _factored(sched)
    assert tirx.ForKind.VECTORIZED in loop_kinds(sched)
    assert_same_result(func, sched, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- the checker catches
def test_checker_catches_a_dropped_ragged_tail():
    """Shrinking the predicate of the ragged last step by one drops the row's last element from the mean."""
    func = layer_norm((3, 77))
    text = _apply(func).script()
    broken = text.replace("< T.int64(77)", "< T.int64(76)")
    assert broken != text, "expected a predicated last step for a 77-long row"
    with pytest.raises(AssertionError):
        assert_same_result(func, from_source(broken))


def test_checker_catches_a_wrong_accumulator_init():
    """Starting the per-chain partial sums (``*_rf_rf``, see RowReduction) at 0.5 instead of 0 must fail."""
    func = layer_norm((16, 384))
    text = _apply(func).script()
    broken = re.sub(r"(_rf_rf\[[^\]]*\] = )T\.float32\(0\.0\)", r"\1T.float32(0.5)", text)
    assert broken != text, "expected the partial sums to be initialized in the script"
    with pytest.raises(AssertionError):
        assert_same_result(func, from_source(broken))
