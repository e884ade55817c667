"""Shared helpers for the schedule tests: build kernels the way the pipeline does, run them, compare."""

from __future__ import annotations

import os

import numpy as np
import tvm
import tvm.sym
from tvm import relax, tirx

from ember.schedules.cpu import common


def host_target() -> tvm.target.Target:
    """The target ember calls "host": LLVM-detected -mcpu (never a fixed ISA) and this machine's cores."""
    return tvm.target.Target({
        "kind": "llvm",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": len(os.sched_getaffinity(0)),
    })


def fused_prim_funcs(relax_mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """Legalize + fuse a Relax module exactly like ember's pipeline and return its PrimFuncs by name."""
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ])
    mod = seq(relax_mod)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def the_kernel(relax_mod: tvm.IRModule, contains: str) -> tirx.PrimFunc:
    funcs = fused_prim_funcs(relax_mod)
    hits = [f for name, f in funcs.items() if contains in name]
    assert len(hits) == 1, f"expected one kernel named *{contains}*, got {sorted(funcs)}"
    return hits[0]


def _compile(func: tirx.PrimFunc, target):
    func = func.with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target)


def random_args(func: tirx.PrimFunc, shape_vars: dict | None = None, seed: int = 0):
    """Random inputs (and zero-filled... no: NaN-filled outputs, so a kernel that skips an element fails)."""
    rng = np.random.default_rng(seed)
    shape_vars = shape_vars or {}
    arrays = []
    for p in func.params:
        shape = []
        for s in p.shape:
            if isinstance(s, tirx.IntImm):
                shape.append(int(s))
            elif isinstance(s, tirx.Var):
                shape.append(int(shape_vars[s.name]))
            else:  # an expression of shape vars, e.g. ``batch * 7`` (a dynamic batch flattened into rows)
                ana = tvm.sym.Analyzer()
                for v in common.vars_in(s):
                    ana.bind(v, tirx.const(int(shape_vars[v.name]), "int64"))
                shape.append(int(ana.simplify(s)))
        dt = str(p.dtype)
        if dt == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        elif "int" in dt:
            arrays.append(rng.integers(0, 4, shape).astype(dt))
        else:
            arrays.append(rng.standard_normal(shape).astype(dt))
    return arrays


def run(func: tirx.PrimFunc, arrays, target=None, n_outputs: int = 1):
    """Run ``func`` (last ``n_outputs`` params are outputs, pre-filled with NaN) and return the outputs."""
    target = target or host_target()
    ex = _compile(func, target)
    dev = tvm.cpu()
    args = []
    for i, a in enumerate(arrays):
        if i >= len(arrays) - n_outputs and a.dtype.kind == "f":
            a = np.full_like(a, np.nan)
        args.append(tvm.runtime.tensor(a, dev))
    ex["main"](*args)
    return [t.numpy() for t in args[-n_outputs:]]


def assert_same_result(ref_func, sched_func, shape_vars=None, n_outputs=1, rtol=1e-5, atol=1e-5, seed=0):
    """The scheduled kernel computes what the unscheduled one does, on random inputs."""
    arrays = random_args(ref_func, shape_vars, seed)
    expected = run(ref_func, arrays, n_outputs=n_outputs)
    actual = run(sched_func, arrays, n_outputs=n_outputs)
    for e, a in zip(expected, actual):
        assert_close(a, e, rtol=rtol, atol=atol)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    if expected.dtype.kind != "f":
        np.testing.assert_array_equal(actual, expected)
        return
    assert not np.isnan(actual).any(), "scheduled kernel left outputs unwritten (NaN) or produced NaN"
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert err <= (atol + rtol) * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


def loop_kinds(func: tirx.PrimFunc) -> set:
    """The set of ForKinds in a function: lets a test check that a rule really parallelized/vectorized."""
    import tvm_ffi

    kinds = set()

    def _visit(node):
        kinds.add(node.kind)

    tvm_ffi.structural_walk(func.body, (tirx.For, _visit), order="post")
    return kinds


def vector_lanes(target) -> int:
    return common.vector_lanes(target, "float32")


def relax_graph(inputs, body) -> tvm.IRModule:
    """A one-function Relax module: ``inputs`` is [(name, shape)] (str dims are symbolic), ``body(*vars)``
    returns the output expression built from ``relax.op`` calls."""
    bb = relax.BlockBuilder()
    sym = {}

    def dim(d):
        if isinstance(d, str):
            sym.setdefault(d, tirx.Var(d, "int64"))
            return sym[d]
        return d

    params = [relax.Var(n, relax.TensorType([dim(d) for d in shape], "float32")) for n, shape in inputs]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(*params))
        bb.emit_func_output(out)
    return bb.get()
