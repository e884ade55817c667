"""Quantization pass: ``apply_quantization(imported, cfg, target) -> (imported, report)``.

Schemes (``ember.config``):

* ``WeightOnly(bits=4|8, group_size, symmetric)`` — linear/matmul weights and embedding tables stored as
  packed INT4 / INT8 codes with fp16 group scales (+ uint8 zero points); kernels decode inside the matmul.
* ``Int8Dynamic()`` — int8 per-channel weights, activations quantized per token (or tensor) at run time,
  u8 x s8 → s32 GEMM (VNNI where the target has it) with the dequantize epilogue.
* ``Int8Static(calibration, method)`` — the same kernels with activation ranges calibrated on user data.
  Both INT8 schemes also quantize NCHW conv2d layers (groups=1, bias and inference BatchNorm folded in) on CPU
  targets with VNNI (``convs="auto"``): per-tensor activation codes, implicit-im2col VNNI GEMM (:mod:`.conv`,
  :mod:`.conv_kernels`); convs left fp32 are listed with the reason in the report's ``fp32_convs``.
* ``Mixed(budget, calibration)`` — 4 or 8-bit weight-only per layer, chosen by measured sensitivity so the
  end-to-end cosine drop on the calibration data stays within ``budget``.

Steps: find the layers (:mod:`.graph`), run the fp32 model with taps on the evaluation data
(:mod:`.reference`), choose per-layer plans (calibration, sensitivity), rewrite the graph with the quantized
kernels (:mod:`.emit`, :mod:`.kernels`), and write the accuracy report (:mod:`.report`). The end-to-end metric
of the *compiled* quantized model is filled in after compilation by ``imported.finish_quantization_report``.
"""

from __future__ import annotations

import time

import numpy as np
import tvm

from ...config import Int8Dynamic, Int8Static, Mixed, WeightOnly
from ...errors import ConfigError
from . import calibrate as _cal
from . import report as _report
from .emit import Emitter
from ...schedules.cpu.common import vector_lanes
from .graph import Rewriter, find_norms, find_sites, rebuild_main


def _target(target):
    if target is None:
        from ...compiler.targets import resolve

        return resolve("host")[1]
    return target


def _validate(cfg, sites):
    group = getattr(cfg, "group_size", None)
    if group is None or group == -1:
        return
    for s in sites:
        if s.kind == "matmul" and s.k % group:
            divisors = [d for d in (128, 64, 32, 16, 8) if s.k % d == 0]
            hint = f"e.g. {divisors[0]}" if divisors else "-1 (one group per output channel)"
            raise ConfigError(f"{type(cfg).__name__}.group_size={group} does not divide the reduction dimension "
                              f"K={s.k} of layer '{s.name}' (weight {s.n}x{s.k}); use a divisor of {s.k}, {hint}")


def _eval_batches(imported, cfg, example_inputs):
    names = [s.name for s in imported.inputs]
    calib = getattr(cfg, "calibration", None)
    if calib is not None:
        return _cal.batches(calib, names), "calibration data"
    if example_inputs is not None:
        ex = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        return [tuple(_cal.to_numpy(a) for a in ex)], "example inputs"
    # ONNX models compiled without examples: a seeded synthetic batch (ints: zeros) so the report still has a
    # number; it says so.
    rng = np.random.default_rng(0)
    batch = []
    for s in imported.inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in (s.shape or ()))
        batch.append(rng.standard_normal(shape).astype(s.dtype) if "float" in s.dtype else np.zeros(shape, s.dtype))
    return [tuple(batch)], "synthetic random inputs"


def _plans(cfg, sites, ref, data, taps_per_batch, outs_ref, verbose):
    plans, extra = {}, {}
    if isinstance(cfg, WeightOnly):
        for i, s in enumerate(sites):
            plans[s.name] = {"scheme": "weight_only", "bits": cfg.bits, "group": cfg.group_size,
                             "symmetric": cfg.symmetric}
            if s.kind == "embedding" and cfg.group_size != -1 and s.k % cfg.group_size:
                plans[s.name]["group"] = -1  # a table row not divisible by the group: one scale per row
            if cfg.calibration is not None and s.kind == "matmul":
                plans[s.name]["gptq_x"] = np.concatenate([ref.site_input(t, i, s.k) for t in taps_per_batch])
        if cfg.calibration is not None:
            extra["weight_rounding"] = "GPTQ error compensation on the calibration data"
    elif isinstance(cfg, Int8Dynamic):
        for s in sites:
            # convs: one scale per tensor whatever the granularity (conv.py says why)
            plans[s.name] = {"scheme": "int8", "per_token": cfg.granularity == "token" and s.kind == "matmul",
                             "static": False, "clip": None, "act_bits": cfg.activation_bits}
    elif isinstance(cfg, Int8Static):
        alpha = cfg.smoothing if cfg.smoothing is not None else (0.5 if cfg.granularity == "tensor" else 0.0)
        for i, s in enumerate(sites):
            if s.kind == "conv2d":  # per-tensor clip from the conv's observed inputs; no smoothing
                values = [ref.site_tensor(t, i) for t in taps_per_batch]
                plans[s.name] = {"scheme": "int8", "per_token": False, "static": True, "act_bits": 8,
                                 "clip": _cal.calibrate(values, cfg.method, cfg.percentile), "smooth": None}
                continue
            values = [ref.site_input(t, i, s.k) for t in taps_per_batch]
            smooth = None
            if alpha > 0:
                w = np.asarray(ref.weights[s.weight_index], np.float32)
                smooth = _cal.smoothing_factors(values, w.T if s.transposed else w, alpha)
                values = [v / smooth for v in values]
            clip = _cal.calibrate(values, cfg.method, cfg.percentile)
            plans[s.name] = {"scheme": "int8", "per_token": cfg.granularity == "token", "static": True,
                             "clip": clip, "act_bits": 8, "smooth": smooth}
        if alpha > 0:
            extra["smoothing"] = alpha
    elif isinstance(cfg, Mixed):
        from .mixed import choose_bits

        bits, extra = choose_bits(cfg, sites, ref, data, outs_ref, verbose)
        for s in sites:
            group = cfg.group_size if s.k % cfg.group_size == 0 else -1
            plans[s.name] = {"scheme": "weight_only", "bits": bits[s.name], "group": group, "symmetric": True}
    return plans, extra


def _quantize_convs(cfg, target) -> tuple:
    """Whether conv2d layers get INT8 kernels here, and if not (for an INT8 scheme) why. Only CPU targets have
    them; with ``convs="auto"`` only those whose int8 dot product is tensorized (VNNI): the plain int32 SIMD
    fallback (AVX2, NEON) is several times slower than ember's fp32 convs."""
    from .gpu import is_gpu_target
    from .kernels import vnni_lanes

    mode = getattr(cfg, "convs", "off")
    if not isinstance(cfg, (Int8Dynamic, Int8Static)):
        return False, None
    if mode == "off":
        return False, "convs='off'"
    if is_gpu_target(target):
        return False, "no INT8 conv kernel for GPU targets yet"
    if mode == "auto" and vnni_lanes(target) is None:
        return False, ("no VNNI on this target: the int32 fallback is slower than fp32 (pass convs='on' to "
                       "quantize anyway)")
    return True, None


def apply_quantization(imported, cfg, target, example_inputs=None, verbose=False):
    if not isinstance(cfg, (WeightOnly, Int8Dynamic, Int8Static, Mixed)):
        raise ConfigError(f"quantization={cfg!r}: use ember.WeightOnly, ember.Int8Dynamic, ember.Int8Static or "
                          "ember.Mixed")
    target = _target(target)
    from .gpu import is_gpu_target  # GPU targets: same plans and report, GPU layouts and kernels (gpu.py)

    if target.kind.name != "llvm" and not is_gpu_target(target):
        raise ConfigError(f"quantization={type(cfg).__name__}: ember has quantized kernels for CPU (llvm) and GPU "
                          f"(cuda, rocm, metal) targets, not {target.kind.name}; compile for one of those or "
                          "without quantization")
    t0 = time.perf_counter()
    func = imported.mod["main"]
    # GELU stays a kernel of its own: in the int8 GEMM's epilogue (find_sites(activations=True), kernels tested) it
    # made MiniLM no faster on this machine (best of 120 runs 8.03 vs 8.07 ms) and slower under load (median 14.3
    # vs 12.0 ms): the erf polynomial costs the same in either place, and the longer parallel region suffers more
    # from preemption.
    convs, conv_why = _quantize_convs(cfg, target)
    sites = find_sites(func, imported.param_names, embeddings=isinstance(cfg, (WeightOnly, Mixed)), convs=convs)
    _validate(cfg, sites)
    report = {"scheme": _report.describe(cfg), "layers": [], "end_to_end": None}
    if isinstance(cfg, (Int8Dynamic, Int8Static)):
        from .conv import skipped_convs

        skipped = skipped_convs(func, sites, imported.param_names, conv_why)
        if skipped:
            report["fp32_convs"] = skipped
    if not sites:
        report["note"] = "no float32 linear/matmul/conv2d weights or embedding tables found; nothing was quantized"
        return imported, report
    from .reference import Reference

    data, data_kind = _eval_batches(imported, cfg, example_inputs)
    ref = Reference(imported, sites, target)
    outs_ref, taps_per_batch = [], []
    for i, batch in enumerate(data):
        o, t = ref.run(batch)
        outs_ref.append(o)
        taps_per_batch.append(t)
        if verbose and len(data) > 4:
            _report.progress("calibrating", i + 1, len(data), t0)
    plans, extra = _plans(cfg, sites, ref, data, taps_per_batch, outs_ref, verbose)

    if is_gpu_target(target):
        from .gpu import GpuEmitter

        emitter = GpuEmitter(imported, plans, target, sites)
    else:
        emitter = Emitter(imported, plans, target)
    norms = find_norms(func, sites, plans, vector_lanes(target, "float32"))
    rewriter = Rewriter(imported.mod, sites, emitter, norms)
    new_body = rewriter.visit_expr(func)
    mod = rewriter.builder_.get()
    new_main, kept = rebuild_main(func, new_body, emitter.new_params)
    mod = tvm.IRModule({gv: (new_main if gv.name_hint == "main" else f) for gv, f in mod.functions.items()})
    mod = mod.with_attrs(imported.mod.attrs) if imported.mod.attrs is not None else mod

    fp32_bytes = int(sum(np.asarray(p).nbytes for p in imported.params))
    params = [imported.params[i] for i in kept] + emitter.new_arrays
    names = [imported.param_names[i] for i in kept] + [v.name for v in emitter.new_params]
    report["layers"] = _report.layer_errors(sites, plans, emitter, ref, taps_per_batch, imported)
    report.update(extra)
    report["param_bytes"] = {"fp32": fp32_bytes, "quantized": int(sum(p.nbytes for p in params))}
    report["param_bytes"]["ratio"] = round(report["param_bytes"]["quantized"] / max(fp32_bytes, 1), 4)
    report["evaluated_on"] = f"{data_kind} ({len(data)} batch{'es' if len(data) != 1 else ''})"
    report["quantize_seconds"] = round(time.perf_counter() - t0, 2)

    imported.mod, imported.params, imported.param_names = mod, params, names

    def finish(compiled, verbose_=verbose):
        """After compilation: run the quantized model on the same data and fill in the end-to-end metric."""
        report["end_to_end"] = _report.end_to_end(compiled, data, outs_ref, data_kind)
        if verbose_:
            print(_report.format_report(report))
        return report

    imported.finish_quantization_report = finish
    return imported, report


__all__ = ["apply_quantization"]
