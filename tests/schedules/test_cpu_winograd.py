"""The WinogradTransform rule (ember.schedules.cpu.winograd) on the kernels ember.passes.winograd emits, fused
the way the pipeline fuses them: it claims the input and output transforms (with their BN/ReLU/residual
epilogues), vectorizes and parallelizes them, leaves the GEMM to the matmul rule, and never changes a result."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, tirx

from ember.passes import winograd
from ember.schedules.cpu import Matmul, WinogradTransform
from helpers import assert_same_result, fused_prim_funcs, host_target, loop_kinds, relax_graph

op = relax.op
TARGET = host_target()


def _fused(monkeypatch, m, c, o, hw, pad, residual):
    monkeypatch.setattr(winograd, "choose_tile", lambda *_: m)

    def body(x, w, b, r):
        y = op.add(op.nn.conv2d(x, w, padding=pad, data_layout="NHWC", kernel_layout="HWIO"), b)
        return op.nn.relu(op.add(y, r) if residual else y)

    oh, ow = hw[0] + pad[0] + pad[2] - 2, hw[1] + pad[1] + pad[3] - 2
    mod = relax_graph([("x", (2, *hw, c)), ("r", (2, oh, ow, o)), ("w", (3, 3, c, o)), ("b", (o,))],
                      lambda x, r, w, b: body(x, w, b, r))
    mod = tvm.IRModule({"main": mod["main"].with_attr("num_input", 2)})
    rewritten = winograd.Winograd(TARGET)(mod)  # the graph is NHWC already: the pass alone
    assert "winograd_gemm" in rewritten["main"].script()
    return fused_prim_funcs(relax.transform.LiftTransformParams()(rewritten))


@pytest.mark.parametrize("m,c,o,hw,pad,residual", [
    (2, 16, 32, (14, 14), (1, 1, 1, 1), True),
    (4, 16, 32, (14, 14), (1, 1, 1, 1), True),
    (4, 5, 20, (9, 11), (1, 1, 1, 1), False),  # partial tiles, channels not a multiple of the lanes
    (2, 24, 16, (12, 17), (2, 0, 2, 0), True),  # asymmetric padding, odd width
])
def test_rule_keeps_results(monkeypatch, m, c, o, hw, pad, residual):
    funcs = _fused(monkeypatch, m, c, o, hw, pad, residual)
    claimed = 0
    for name, func in funcs.items():
        if "winograd_input" in name or "winograd_output" in name:
            with TARGET:
                sch = WinogradTransform().apply(func, TARGET, False)
            assert sch is not None, f"{name}: not claimed"
            sched = sch.mod["main"]
            assert tirx.ForKind.PARALLEL in loop_kinds(sched)
            if (o if "output" in name else c) % 16 == 0:
                assert tirx.ForKind.VECTORIZED in loop_kinds(sched)
            assert_same_result(func, sched)
            claimed += 1
        elif "winograd_gemm" in name:
            with TARGET:
                assert WinogradTransform().apply(func, TARGET, False) is None  # the matmul rule's
                sch = Matmul().apply(func, TARGET, False)
            assert sch is not None
            assert_same_result(func, sch.mod["main"], rtol=1e-4)
    assert claimed == 2


def test_rule_ignores_other_kernels():
    mod = relax_graph([("x", (4, 64)), ("y", (4, 64))], lambda x, y: op.nn.relu(op.add(x, y)))
    (func,) = fused_prim_funcs(mod).values()
    with TARGET:
        assert WinogradTransform().apply(func, TARGET, False) is None
