"""``ember.compile``: frontend → prepare → weight transforms (run once, here) → lower for the target."""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import ConfigError, EmberError, ModelLoadError
from ..frontends.spec import ImportedModel
from .cuda_aot import cuda_build_environment
from .metal import metal_build_environment
from .rocm_aot import rocm_build_environment
from .targets import device_kind, required_cpu_flags, resolve, target_arch, target_os


def import_model(model, example_inputs=None, *, dynamic_batch=False, input_names=None,
                 output_names=None) -> ImportedModel:
    """Pick the frontend from what ``model`` is: ONNX (path or ModelProto) or PyTorch (module, program, .pt2)."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if path.lower().endswith(".onnx"):
            from ..frontends.onnx import import_onnx

            return import_onnx(path, dynamic_batch=dynamic_batch, input_names=input_names,
                               output_names=output_names)
        if path.lower().endswith((".pt2", ".pt")):
            from ..frontends.torch import import_torch

            return import_torch(path, dynamic_batch=dynamic_batch, input_names=input_names,
                                output_names=output_names)
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such file")
        raise ModelLoadError(f"{path}: unknown model format; ember reads .onnx files and .pt2 files written by "
                             "torch.export.save")
    if type(model).__module__.startswith("onnx"):
        from ..frontends.onnx import import_onnx

        return import_onnx(model, dynamic_batch=dynamic_batch, input_names=input_names,
                           output_names=output_names)
    from ..frontends.torch import import_torch

    return import_torch(model, example_inputs, dynamic_batch=dynamic_batch, input_names=input_names,
                        output_names=output_names)


def _tuning_database(tuning, model, example_inputs, tgt, *, dynamic_batch, quantization, sparsity, precision=None):
    """Tune first when ``tuning`` has a budget, then open its database for ``lower``; (None, None) without tuning."""
    if tuning is None:
        return None, None
    from ..config import Tuning

    if not isinstance(tuning, Tuning):
        raise ConfigError(f"tuning={tuning!r}: pass ember.Tuning(database=DIR, apply_only=True) to use tuned "
                          "records, or ember.Tuning(trials=N, database=DIR) to tune first")
    from ..schedules.apply import open_for_compile

    info = {"database": None, "tuned_now": None}
    if not tuning.apply_only:
        from ..schedules.tune import tune

        report = tune(model, tgt, tuning, example_inputs=example_inputs, dynamic_batch=dynamic_batch,
                      quantization=quantization, sparsity=sparsity, precision=precision)
        info["tuned_now"] = {k: v for k, v in report.to_json().items() if k != "tasks"}
    db = open_for_compile(tuning, tgt)
    info["database"] = str(db.path)
    info["records"] = len(db)
    return db, info


def _transform_params(mod, params):
    """Run main_transform_params once on the host; returns main alone plus the weights it now takes."""
    import tvm
    from tvm import relax

    from .pipeline import TRANSFORM_PARAMS, lower_unscheduled

    if TRANSFORM_PARAMS not in [gv.name_hint for gv in mod.functions]:
        return mod, params
    host = tvm.target.Target({"kind": "llvm"})
    # Each side keeps the helper functions (TIR kernels some importers emit) it may call.
    funcs = {gv: f for gv, f in mod.functions.items()}
    tmod = tvm.IRModule({gv: f for gv, f in funcs.items() if gv.name_hint != "main"})
    # Only what the transform calls: main's kernels may be scheduled for the real target (e.g. VNNI
    # intrinsics), which the generic host target here cannot code-generate.
    tmod = relax.transform.DeadCodeElimination([TRANSFORM_PARAMS])(tmod)
    with host:
        ex = tvm.compile(tmod, host, relax_pipeline=lower_unscheduled())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    dev_params = [tvm.runtime.tensor(np.ascontiguousarray(p), tvm.cpu()) for p in params]
    out = vm[TRANSFORM_PARAMS](dev_params)
    new_params = [out[i] for i in range(len(out))] if not hasattr(out, "numpy") else [out]
    main_only = tvm.IRModule({gv: f for gv, f in funcs.items() if gv.name_hint != TRANSFORM_PARAMS})
    # Precomputed weights that repeat along an axis (a broadcast constant) are stored once (passes.shrink_params).
    from ..passes.shrink_params import shrink_repeated_params

    main_only, new_params, _ = shrink_repeated_params(main_only, new_params)
    return main_only, new_params


def compile_model(model, example_inputs=None, *, target="host", dynamic_batch=False, input_names=None,
                  output_names=None, quantization=None, sparsity=None, tuning=None, verbose=False,
                  fusion=True, precision=None, cuda_graph=None):
    import tvm

    from ..runtime.module import CompiledModel
    from ..version import __version__
    from .pipeline import lower, prepare

    from ..passes.compress import compress

    name, tgt = resolve(target)
    tuning_db, tuning_info = _tuning_database(tuning, model, example_inputs, tgt, dynamic_batch=dynamic_batch,
                                              quantization=quantization, sparsity=sparsity, precision=precision)
    tuning_stats = {}
    t0 = time.perf_counter()
    imported = import_model(model, example_inputs, dynamic_batch=dynamic_batch, input_names=input_names,
                            output_names=output_names)
    from ..passes.precision import normalize_precision
    from ..passes.quantize.gpu import half_activations  # fp16 x for the GPU INT4 layers (the PDL GEMV)

    with half_activations(normalize_precision(precision) == "fp16"):
        imported, compression = compress(imported, quantization=quantization, sparsity=sparsity, target=tgt,
                                         example_inputs=example_inputs, verbose=verbose, precision=precision)
    from ..passes.precision import apply_precision  # precision="fp16": fp32 import, then half the graph

    # (with a sparsity, compress ran the precision pass itself, before packing: its report says so)
    imported, precision_report = apply_precision(imported, None if "precision" in compression else precision)
    if precision_report is not None:
        compression = {**compression, "precision": precision_report}
    t1 = time.perf_counter()
    mod = prepare(imported.mod, fusion=fusion, target=tgt)
    mod, weights = _transform_params(mod, imported.params)
    t2 = time.perf_counter()
    # fusion=False (internal: benchmarks, before/after) compiles with TVM's default FuseOps only.
    from .kernel_report import default_pipeline_report

    kernels_after: dict = {}
    try:
        kernels_before = default_pipeline_report(mod)
    except Exception:  # noqa: BLE001 - the baseline is only for the report
        # TVM's default FuseOps/FuseTIR fails on some symbolic-shape graphs (FuseTIR: "output params of a
        # PrimFunc must be buffers") that ember's fusion handles; the model still compiles, the report just
        # has no "before" column.
        kernels_before = None
    try:
        # For CUDA targets: real device code (an nvcc fatbin for the target's arch), even without a GPU or driver.
        # CUDA graphs: on by default for CUDA (cuda_graph=None); the runtime captures on the first call.
        use_graph = device_kind(tgt) == "cuda" if cuda_graph is None else bool(cuda_graph)
        graph_ctx = tvm.transform.PassContext.current()
        graph_cfg = {**dict(graph_ctx.config), "relax.backend.use_cuda_graph": use_graph}
        # ROCm: AMDGPU code objects linked here (ember.compiler.rocm_aot); Metal: fast intrinsics import.
        with cuda_build_environment(tgt, name) as cuda, rocm_build_environment(tgt, name) as rocm, \
                metal_build_environment(tgt, name) as metal, tgt, tvm.transform.PassContext(
                opt_level=graph_ctx.opt_level, config=graph_cfg):
            ex = tvm.compile(mod, tgt, relax_pipeline=lower(tgt, tuning_db, tuning_stats, fusion=fusion,
                                                            kernel_report=kernels_after))
    except EmberError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()
        raise EmberError(f"compiling {imported.source or 'the model'} for {name} failed in TVM: "
                         f"{type(e).__name__}: {first[-1] if first else ''}. Please report this with the model.") from e
    t3 = time.perf_counter()
    manifest = {
        "format": "ember-artifact",
        "format_version": 1,
        "ember_version": __version__,
        "tvm_version": tvm.__version__,
        "source": str(imported.source),
        "target": {
            "name": name,
            "tvm": str(tgt),
            "device": device_kind(tgt),
            "arch": target_arch(tgt),
            "os": target_os(tgt),
            "cpu_flags": required_cpu_flags(tgt),
            # CUDA: export fills in "device_code" after checking the library ({"device_code": "fatbin", ...}).
            **({"gpu": {"device_code": None, "arch": cuda.arch}, "cuda_graph": use_graph} if cuda.active else {}),
            # ROCm / Metal: likewise filled in by export (code object version, MSL per kernel).
            **({"gpu": rocm.manifest_entry()} if rocm.active else {}),
            **({"gpu": metal.manifest_entry()} if metal.active else {}),
        },
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": [s.to_json() for s in imported.outputs],
        "compression": compression,
        "kernels": {"ember": kernels_after, "tvm_default": kernels_before, "fusion": bool(fusion)},
        "tuning": None if tuning_info is None else {**tuning_info, **{k: v for k, v in tuning_stats.items()
                                                                      if k != "tuned"}},
        "compile_seconds": {"import": round(t1 - t0, 3), "weights": round(t2 - t1, 3),
                            "codegen": round(t3 - t2, 3)},
    }
    if verbose:
        print(f"ember: imported in {t1 - t0:.1f} s, weights prepared in {t2 - t1:.1f} s, "
              f"compiled for {name} in {t3 - t2:.1f} s")
    cm = CompiledModel(ex, weights, manifest, device=manifest["target"]["device"])
    cm._executable = ex
    finish = getattr(imported, "finish_quantization_report", None)
    if finish is not None:  # the end-to-end accuracy of the compiled quantized model (lands in the manifest)
        finish(cm, verbose)
    return cm
