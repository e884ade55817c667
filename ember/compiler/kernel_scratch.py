"""Kernel-internal scratch buffers in registers, for the GPU code generators.

A schedule may leave an intermediate buffer in the default ("global") scope although every access to it lies
inside one GPU kernel — e.g. a matmul result that a fused epilogue (bias add) reads right after a cross-thread
reduction, when the rule moved the epilogue into the kernel but did not give the result a scope. TVM then
allocates the buffer *inside* the kernel, which no backend accepts:

* CUDA: "Cannot allocate global memory when targeting CUDA";
* ROCm (LLVM AMDGPU): "Can only allocate shared or local memory inside kernel";
* Metal: prints ``device float buf[N];`` in the kernel body, which is not valid Metal — the artifact would only
  fail on the Mac, when the driver compiles the source.

This pass gives such buffers the "local" scope (per-thread registers), which is what dlight's own rules do for
a reduction result an epilogue reads: the cross-thread reduction hands its result to every thread of the group,
so each thread's copy holds the same value (the lowered kernels write it from the broadcast ``red_result``). A
buffer shared by two kernels (or touched outside any kernel) stays global: it is a real device buffer that TVM
allocates around the launches.

    # before                                       # after
    C = T.sblock_alloc_buffer((4, 10))             C = T.sblock_alloc_buffer((4, 10), scope="local")
    for bx in T.thread_binding(5, "blockIdx.x"):   for bx in T.thread_binding(5, "blockIdx.x"):
        ... C[...] = reduce ...; out = C + bias        ... (unchanged)
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

# CUDA refuses them too ("Cannot allocate global memory when targeting CUDA").
NEEDS_IT = ("cuda", "rocm", "metal", "vulkan", "opencl", "webgpu")


def _blocks(sch: s_tir.Schedule, parent=None) -> list:
    """Every block of the function below ``parent`` (the root block when None), depth first."""
    out = []
    for child in sch.get_child_blocks(parent if parent is not None else sch.get_sblock("root")):
        out.append(child)
        out.extend(_blocks(sch, child))
    return out


def _placement(sch: s_tir.Schedule, block_rv):
    """(outermost loop of the block or None, whether that loop is a GPU thread binding)."""
    loops = sch.get_loops(block_rv)
    if not loops:
        return None, False
    top = sch.get(loops[0])
    return top, top.kind == tirx.ForKind.THREAD_BINDING


def scratch_to_local(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The PrimFunc with each kernel-internal global intermediate buffer moved to "local" (see module doc)."""
    body = func.body
    if not isinstance(body, s_tir.SBlockRealize):
        return func
    globals_ = [b for b in body.block.alloc_buffers if b.scope() == "global"]
    if not globals_:
        return func
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    info = []
    for rv in blocks:
        stmt = sch.get(rv)
        top, in_kernel = _placement(sch, rv)
        info.append((rv, top, in_kernel, [r.source for r in stmt.writes], [r.source for r in stmt.reads]))

    def touches(bufs, buf):
        return any(b.same_as(buf) for b in bufs)

    changed = False
    for buf in globals_:
        users = [(top, k) for _rv, top, k, writes, reads in info if touches(writes, buf) or touches(reads, buf)]
        # Only a buffer confined to one kernel: every user under the same thread-bound outermost loop.
        if not users or not all(k for _t, k in users) or any(not t.same_as(users[0][0]) for t, _k in users):
            continue
        for rv, _t, _k, writes, _r in info:
            if touches(writes, buf):
                idx = next(i for i, b in enumerate(writes) if b.same_as(buf))
                sch.set_scope(rv, idx, "local")
                changed = True
                break
    return sch.mod["main"] if changed else func


def scratch_to_local_pass(target) -> tvm.transform.Pass:
    """Module pass for the pipeline, after scheduling: identity unless the target is a GPU."""
    kind = str(target.kind.name)

    @tvm.transform.module_pass(opt_level=0, name="ember.kernel_scratch_to_local")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if kind not in NEEDS_IT:
            return mod
        funcs = {gv: scratch_to_local(f) if isinstance(f, tirx.PrimFunc) else f for gv, f in mod.functions.items()}
        return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)

    return _pass
