"""Default (untuned) schedules for every kernel ember compiles.

``schedule_pass(target)`` returns the module pass the pipeline runs right after ``FuseOps``/``FuseTIR`` and before
the lowering passes. It applies ember's rules to every PrimFunc that is not yet marked ``tirx.is_scheduled``:

* ``llvm`` targets: float32 ``exp``/``erf``/``tanh`` are first rewritten into vectorizable arithmetic
  (:mod:`ember.schedules.cpu.fast_math`: LLVM would call libm once per element), then ember's CPU rules in
  :mod:`ember.schedules.cpu` (matmul/conv, elementwise, row reductions, then a catch-all that only parallelizes);
* GPU targets (cuda, rocm, metal, vulkan, opencl, webgpu): ember's GPU rules (:mod:`ember.schedules.gpu`: GEMV,
  tensor-core GEMM) then dlight's default GPU rules, so every kernel gets thread bindings (a GPU kernel without
  them does not run);
* anything else: the identity pass.

The pass reads the target from its argument, not from ``Target.current()``, and stamps it on each function it
schedules only implicitly via the rules; the pipeline is free to run it inside or outside ``with target:``.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

_GPU_KINDS = {"cuda", "rocm", "metal", "vulkan", "opencl", "webgpu"}


def cpu_rules():
    from .cpu import rules  # pylint: disable=import-outside-toplevel

    return rules()


def gpu_rules():
    # ember's own first where dlight is weak (ember.schedules.gpu): decode-shaped GEMV (batch 1..8, any weight
    # layout) and fp16 GEMMs on tensor cores (dlight's own check never reaches them for sm_90a); then dlight.
    from .gpu import GEMV, TensorCoreMatmul  # pylint: disable=import-outside-toplevel
    from .gpu.hopper_gemm import HopperGemm  # pylint: disable=import-outside-toplevel  # wgmma, sm_90a only
    from .gpu.row_norm import RowNorm  # pylint: disable=import-outside-toplevel  # warp-per-row layer norms (CUDA)

    return [GEMV(), HopperGemm(), TensorCoreMatmul(), RowNorm(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def rules_for(target: tvm.target.Target):
    kind = target.kind.name
    if kind == "llvm":
        return cpu_rules()
    if kind in _GPU_KINDS:
        return gpu_rules()
    return []


def schedule_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """The module pass that schedules every not-yet-scheduled PrimFunc for ``target`` (see module doc)."""
    if isinstance(target, (str, dict)):
        target = tvm.target.Target(target)
    rules = rules_for(target)
    if not rules:
        return tvm.transform.Sequential([], name="ember.schedule(identity)")

    cpu = target.kind.name == "llvm"

    @tvm.transform.module_pass(opt_level=0, name="ember.schedule")
    def _schedule(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if cpu:
            mod = _fast_math(mod)
        # ApplyDefaultSchedule takes the target from each function's "target" attribute or, failing that, from
        # Target.current(); entering ``target`` here makes the pass independent of the caller's context.
        with target:
            return dl.ApplyDefaultSchedule(*rules)(mod)

    return _schedule


def _fast_math(mod: tvm.IRModule) -> tvm.IRModule:
    """Vectorizable exp/erf/tanh in every PrimFunc. Kernels already scheduled (tuned records, hand-written
    kernels) get it too: the rewrite only replaces expressions, so their loop structure is kept. It runs after
    the tuning database was applied, whose lookup keys on the kernels as they were extracted."""
    from .cpu.fast_math import rewrite_transcendentals  # pylint: disable=import-outside-toplevel

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            func = rewrite_transcendentals(func)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)


__all__ = ["schedule_pass", "rules_for", "cpu_rules", "gpu_rules"]
