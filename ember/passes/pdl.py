"""Programmatic dependent launch (PDL) for CUDA sm_90+: every kernel lets the next one start early.

ember's INT4 GEMV for fp16 activations (:data:`ember.schedules.gpu.quant_gemv.STAGED_FP16_PDL`) is launched with
the PDL attribute: its blocks start while the kernel before it is still running, copy their weights (model
constants) into shared memory, and only then execute ``griddepcontrol.wait``, which blocks until the previous grid
has *completed* and its memory is visible; x is read and y written only after it. A dependent grid may start early
only when every block of the kernel before it has executed ``griddepcontrol.launch_dependents`` (or exited), so the
producers of x — the norm, the activation, the casts — must execute it. This pass puts it at the start of each
kernel's body:

    for bx in T.thread_binding(64, "blockIdx.x"):          for bx in T.thread_binding(64, "blockIdx.x"):
        for tx in T.thread_binding(128, "threadIdx.x"):  →      ember_grid_dep_launch()   # griddepcontrol.launch_dependents
            ...                                                 for tx in T.thread_binding(128, "threadIdx.x"): ...

Why it is safe for every kernel: the trigger only allows the *scheduling* of a dependent grid; the dependent's
``griddepcontrol.wait`` still waits for this grid's completion and memory flush, and the only dependents that take
the early start are the PDL GEMVs, which write nothing but their own shared memory before the wait (so no
write-after-read on a buffer the memory planner reuses). A kernel launched without the PDL attribute waits for its
predecessor as always: the trigger is a no-op then. Blocks of a multi-wave kernel trigger as they start, so the
dependent is scheduled only once the last wave is resident (it takes no SM slot from this kernel's blocks).

Opt out with the environment variable ``EMBER_PDL=0`` (read at compile time): no trigger here and no PDL GEMV in
:mod:`ember.passes.quantize.gpu` (the tiled fp32-x kernel instead). Targets below sm_90 and non-CUDA targets are
left alone (``griddepcontrol`` is an sm_90 instruction).
"""

from __future__ import annotations

import os
import re

import tvm
from tvm import tirx

ENV = "EMBER_PDL"
TRIGGER = "ember_grid_dep_launch"


def enabled() -> bool:
    """PDL on unless ``EMBER_PDL`` is "0"/"off"/"false"/"no" (see module doc)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def target_supports(target) -> bool:
    """CUDA targets of compute capability 9.0 or later (``griddepcontrol`` needs sm_90)."""
    if target is None or target.kind.name != "cuda":
        return False
    m = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return m is not None and int(m.group(1)) >= 90


def _trigger_call():
    from tvm.backend.cuda.op import cuda_func_call

    from ..schedules.gpu.quant_gemv import _PDL_LAUNCH_CUDA  # pylint: disable=protected-access

    return cuda_func_call(TRIGGER, source_code=_PDL_LAUNCH_CUDA)


def _is_launch_loop(stmt) -> bool:
    """A GPU thread binding (blockIdx or threadIdx: a kernel of one block binds threadIdx alone)."""
    if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.THREAD_BINDING:
        return True
    return isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent"


def _is_pdl_kernel(func: tirx.PrimFunc) -> bool:
    """A kernel launched with the PDL attribute (the PDL GEMVs; they place their own trigger)."""
    from ..schedules.gpu.quant_gemv import PDL_TAG

    tags = func.attrs.get("tirx.kernel_launch_params") if func.attrs is not None else None
    return tags is not None and PDL_TAG in [str(t) for t in tags]


def _mentions_trigger(func: tirx.PrimFunc) -> bool:
    """A PDL kernel or one this pass has already rewritten."""
    return _is_pdl_kernel(func) or bool(func.attrs is not None and func.attrs.get("ember.pdl_trigger"))


def _with_trigger(loop, call):
    """The launch loop nest starting at ``loop`` with the trigger first inside its innermost thread binding (any one
    thread's trigger counts for its block)."""
    chain, inner = [], loop
    while _is_launch_loop(inner):
        chain.append(inner)
        inner = inner.body
    body = tirx.SeqStmt([tirx.Evaluate(call), inner])
    for node in reversed(chain):
        if isinstance(node, tirx.For):
            body = tirx.For(node.loop_var, node.min, node.extent, node.kind, body, node.thread_binding,
                            node.annotations)
        else:
            body = tirx.AttrStmt(node.node, node.attr_key, node.value, body)
    return body


def _rewrite(stmt, call, count):
    """Down to each outermost launch loop through the statements that sit above kernels in ember's scheduled
    functions (blocks, sequences, serial loops, attributes, branches); a launch loop is not entered (the loops
    inside it belong to the same launch)."""
    from tvm import s_tir

    if _is_launch_loop(stmt):
        count.append(1)
        return _with_trigger(stmt, call)
    if isinstance(stmt, s_tir.SBlockRealize):
        b = stmt.block
        body = _rewrite(b.body, call, count)
        if body.same_as(b.body):
            return stmt
        block = s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, body, b.init, b.alloc_buffers,
                             b.match_buffers, b.annotations)
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rewrite(s, call, count) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.For):
        body = _rewrite(stmt.body, call, count)
        return stmt if body.same_as(stmt.body) else tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                                                               stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.AttrStmt):
        body = _rewrite(stmt.body, call, count)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.IfThenElse):
        then = _rewrite(stmt.then_case, call, count)
        other = _rewrite(stmt.else_case, call, count) if stmt.else_case is not None else None
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other)
    return stmt


def add_trigger(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with ``griddepcontrol.launch_dependents`` first in each kernel launch (outermost blockIdx loop);
    functions without a GPU launch, and those that trigger already (the PDL GEMVs, which trigger after their own
    wait), are returned unchanged."""
    if _mentions_trigger(func):
        return func
    count: list = []
    body = _rewrite(func.body, _trigger_call(), count)
    return func.with_body(body).with_attr("ember.pdl_trigger", True) if count else func


def trigger_pass(target) -> tvm.transform.Pass:
    """Module pass (after ember's schedules): :func:`add_trigger` on every PrimFunc but reshapes, for sm_90+ CUDA
    targets with PDL on (:func:`enabled`) and only in modules that hold a PDL kernel; identity otherwise."""

    @tvm.transform.module_pass(opt_level=0, name="ember.PDLTrigger")
    def run(mod, _ctx):
        if not (enabled() and target_supports(target)):
            return mod
        prims = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
        if not any(_is_pdl_kernel(f) for _, f in prims):
            return mod  # no kernel would take the early start: leave every kernel as it is
        from tvm.relax.analysis import has_reshape_pattern

        updates = {}
        for gv, func in prims:
            # A reshape kernel becomes a no-op view in RewriteDataflowReshape (later in the pipeline) only while
            # its body is the plain copy pattern: a trigger in it would turn every reshape into a launched copy
            # (MiniLM fp16 b32: 61 -> 115 launches, 0.77 -> 1.10 ms on the H100).
            if not has_reshape_pattern(func):
                new = add_trigger(func)
                if not new.same_as(func):
                    updates[gv] = new
        if updates:
            mod = mod.clone()  # the caller's module stays as it was
            for gv, func in updates.items():
                mod[gv] = func
        return mod

    return run
