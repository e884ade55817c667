"""ember.schedules.schedule_pass: schedules every kernel of a module, end to end through the Relax VM (with a
symbolic batch), and gives GPU kernels thread bindings."""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from ember.schedules import schedule_pass
from helpers import assert_close, host_target, loop_kinds, relax_graph

op = relax.op


def _encoder_block(x, w1, b1, w2, g, b):
    """A transformer-ish block: dense + GELU, dense, residual, layernorm, softmax over the last axis."""
    h = op.nn.gelu(op.add(op.matmul(x, w1), b1))
    y = op.add(op.matmul(h, w2), x)
    y = op.nn.layer_norm(y, g, b, axes=[-1])
    return op.nn.softmax(y, axis=-1)


def _build(target):
    mod = relax_graph([("x", ("batch", 9, 24)), ("w1", (24, 40)), ("b1", (40,)), ("w2", (40, 24)),
                       ("g", (24,)), ("b", (24,))], _encoder_block)
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
        schedule_pass(target),
    ])
    return seq(mod)


def _reference(x, w1, b1, w2, g, b):
    from math import erf

    h = x @ w1 + b1
    h = h * 0.5 * (1.0 + np.vectorize(erf)(h / np.sqrt(2.0)))
    y = h @ w2 + x
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    y = (y - mu) / np.sqrt(var + 1e-5) * g + b
    e = np.exp(y - y.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_every_kernel_scheduled_and_vm_matches_numpy():
    target = host_target()
    scheduled = _build(target)
    prims = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert any("matmul" in n for n in prims)
    for name, f in prims.items():
        assert f.attrs is not None and f.attrs.get("tirx.is_scheduled", False), f"{name} was not scheduled"

    ex = tvm.compile(scheduled, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(s).astype("float32") for s in [(24, 40), (40,), (40, 24), (24,), (24,)]]
    for batch in (1, 3):
        x = rng.standard_normal((batch, 9, 24)).astype("float32")
        out = vm["main"](*[tvm.runtime.tensor(a) for a in [x, *w]]).numpy()
        assert_close(out, _reference(x.astype(np.float64), *[a.astype(np.float64) for a in w]), rtol=1e-4)


def test_gpu_targets_get_thread_bindings():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    scheduled = _build(target)
    for gv, f in scheduled.functions.items():
        if isinstance(f, tirx.PrimFunc):
            assert tirx.ForKind.THREAD_BINDING in loop_kinds(f), f"{gv.name_hint} has no thread bindings"


def test_scheduled_functions_are_left_alone():
    target = host_target()
    once = _build(target)
    twice = schedule_pass(target)(once)
    for gv, f in once.functions.items():
        if isinstance(f, tirx.PrimFunc):
            assert tvm_ffi.structural_equal(f, twice[gv])
