"""The compilation pipeline: what runs between an imported Relax module and an executable.

Two stages:

1. ``prepare`` (target-independent, Relax level): decompose training-only ops for inference, then
   ``LiftTransformParams`` moves every computation that depends on weights alone (transposes of linear weights,
   constant folding of BN scales, later packing of quantized/sparse weights) into ``main_transform_params``.
   ember runs that function once at compile time, so the artifact stores weights already in the layout the
   kernels read and nothing weight-only is recomputed per inference.
2. ``lower(target)``: legalize Relax ops to TIR, fuse, schedule every kernel with ember's rules for the target,
   then lower to the VM.
"""

from __future__ import annotations

import tvm
from tvm import relax

TRANSFORM_PARAMS = "main_transform_params"


def prepare(mod: tvm.IRModule, fusion: bool = True, target=None) -> tvm.IRModule:
    """``fusion=False`` skips ember's BatchNorm folding (TVM's default pipeline, for before/after comparisons).
    ``target``: CPU targets get ember's layouts (ember.passes.layout: NHWC convs, packed dense/conv weights),
    chosen here so the weight re-layouts are lifted and run once at compile time."""
    from ..passes.fold_bn import FoldBatchNorm
    from ..passes.layout import layout_pass

    seq = tvm.transform.Sequential(([FoldBatchNorm] if fusion else []) + [
        relax.transform.DecomposeOpsForInference(),
        layout_pass(target),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LiftTransformParams(),
    ])
    return seq(mod)


def _legalize_and_fuse(target=None, fusion: bool = False, kernel_groups: dict | None = None):
    """``fusion`` (needs ``target``): ember's fusion passes (ember.passes.fusion) before TVM's FuseOps.
    ``kernel_groups`` (a dict) receives which ops each fused kernel holds, for the kernel report."""
    ember_fusion, record = [], []
    if fusion and target is not None:
        from ..passes.fusion import fusion_passes

        ember_fusion = fusion_passes(target)
    if kernel_groups is not None:
        from .kernel_report import record_groups_pass

        record = [record_groups_pass(kernel_groups)]
    return ember_fusion + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        *record,
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def _lower_to_vm():
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        # CUDA graphs (a no-op unless PassContext config "relax.backend.use_cuda_graph" is set, as ember.compile
        # does for CUDA): kernels that touch only weights and statically planned buffers are captured once and
        # replayed, which removes the per-kernel launch cost that dominates small-batch inference.
        relax.transform.RewriteCUDAGraph(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def fuse_pass(target=None, fusion: bool = True) -> tvm.transform.Pass:
    """Legalize + fuse alone: the module as ``lower`` has it right before scheduling (what tuning extracts from)."""
    return tvm.transform.Sequential(_legalize_and_fuse(target, fusion), name="ember.fuse")


def lower(target: tvm.target.Target, tuning_database=None, tuning_stats: dict | None = None, *,
          fusion: bool = True, kernel_report: dict | None = None) -> tvm.transform.Pass:
    """``tuning_database``: a MetaSchedule database; kernels it has records for take their tuned schedule, the
    others keep ember's rules (the rule pass skips functions already marked ``tirx.is_scheduled``).
    ``tuning_stats`` (a dict) receives how many kernels came from the database.
    ``fusion=False`` turns ember's fusion passes off (TVM's default FuseOps only: the baseline of the kernel
    report and of benchmarks/fusion_bench.py). ``kernel_report`` (a dict) receives the kernel report
    (ember.compiler.kernel_report) of the module as it is lowered."""
    from ..schedules import schedule_pass

    tuned = []
    if tuning_database is not None:
        from ..schedules.apply import apply_database_pass

        tuned = [apply_database_pass(tuning_database, target, tuning_stats)]
    groups = {} if kernel_report is not None else None
    report = []
    if kernel_report is not None:
        from .kernel_report import report_pass

        report = [report_pass(groups, kernel_report)]
    from .kernel_scratch import scratch_to_local_pass  # GPU backends reject kernel-internal global buffers
    from ..passes.pdl import trigger_pass  # sm_90+: every kernel lets a PDL GEMV after it start early

    return tvm.transform.Sequential(_legalize_and_fuse(target, fusion, groups) + tuned + [schedule_pass(target)]
                                    + [scratch_to_local_pass(target), trigger_pass(target)] + report
                                    + _lower_to_vm(),
                                    name="ember.lower")


def lower_unscheduled() -> tvm.transform.Pass:
    """For host-side work run once at compile time (weight transforms): correctness matters, speed not."""
    return tvm.transform.Sequential(_legalize_and_fuse() + _lower_to_vm(), name="ember.lower_unscheduled")
