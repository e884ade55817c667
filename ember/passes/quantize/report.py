"""The accuracy report of a quantized compile: per-layer errors and the end-to-end metric.

Per layer (relative L2 errors, measured on the evaluation data's actual layer inputs):
  weight_error      ||W - deq(Q(W))|| / ||W||
  activation_error  ||x - deq(Q(x))|| / ||x||   (schemes that quantize activations)
  output_error      ||x W - deq(Q(x)) deq(Q(W))|| / ||x W||   (the layer's output as the kernels compute it)
End to end: cosine similarity of the compiled quantized model's outputs with the fp32 model's, per output row,
averaged (and the minimum) over the evaluation data (calibration data, else the example inputs).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import qmath

_MAX_ROWS = 512  # rows of layer input used per layer for the report's error estimates


def describe(cfg) -> dict:
    d = {"type": type(cfg).__name__}
    for k, v in vars(cfg).items():
        if k == "calibration":
            try:
                d["calibration_batches"] = len(v)
            except TypeError:
                pass
            continue
        if isinstance(v, (int, float, str, bool)) or v is None:
            d[k] = v
    return d


def progress(what: str, done: int, total: int, t0: float):
    el = time.perf_counter() - t0
    eta = el / done * (total - done) if done else 0.0
    bar = "#" * int(24 * done / total)
    sys.stderr.write(f"\rember: {what} [{bar:<24}] {done}/{total} {el:.0f}s, ETA {eta:.0f}s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _inputs(ref, taps_per_batch, i, k):
    rows = []
    n = 0
    for t in taps_per_batch:
        x = ref.site_input(t, i, k)
        if x is None:
            return None
        rows.append(x)
        n += x.shape[0]
        if n >= _MAX_ROWS:
            break
    return np.concatenate(rows)[:_MAX_ROWS]


def layer_errors(sites, plans, emitter, ref, taps_per_batch, imported) -> list:
    out = []
    for i, s in enumerate(sites):
        plan = plans[s.name]
        if s.kind == "conv2d":
            out.append(_conv_errors(s, plan, emitter, ref, taps_per_batch, i))
            continue
        w = np.asarray(imported.params[s.weight_index], np.float32)
        if s.kind == "matmul" and s.transposed:
            w = w.T
        deq = emitter.dequantized[s.name]
        entry = {"layer": s.name, "kind": s.kind, "shape": [s.k, s.n] if s.kind == "matmul" else [s.n, s.k],
                 "bits": plan.get("bits", 8), "weight_error": round(qmath.relative_error(w, deq), 6)}
        if plan["scheme"] == "weight_only":
            entry["group_size"] = plan["group"]
        if s.kind == "matmul":
            x = _inputs(ref, taps_per_batch, i, s.k)
            if x is not None:
                y = x @ w
                if plan["scheme"] == "int8":
                    qmax = (1 << (plan["act_bits"] - 1)) - 1
                    smooth = plan.get("smooth")
                    xin = x if smooth is None else x / smooth
                    q, sc = qmath.quantize_activation_rows(xin, qmax, clip=plan["clip"], per_token=plan["per_token"])
                    xd = q.astype(np.float32) * sc[:, None] * (1 if smooth is None else smooth)
                    entry["activation_error"] = round(qmath.relative_error(x, xd), 6)
                    if plan["static"]:
                        entry["activation_clip"] = round(float(plan["clip"]), 6)
                else:
                    xd = x
                entry["output_error"] = round(qmath.relative_error(y, xd @ deq), 6)
        out.append(entry)
    return out


def _conv_errors(s, plan, emitter, ref, taps_per_batch, i) -> dict:
    """A conv layer's errors, on up to _MAX_ROWS output pixels' worth of its observed input images."""
    from . import conv as cv

    w, bias = emitter.conv_fp32[s.name]
    deq = emitter.dequantized[s.name]
    spec = s.conv
    entry = {"layer": s.name, "kind": "conv2d", "shape": list(w.shape), "bits": 8,
             "weight_error": round(qmath.relative_error(w, deq), 6), "activation_granularity": "tensor",
             "stride": list(spec.strides), "padding": list(spec.pads)}
    if s.bn is not None:
        entry["batch_norm_folded"] = True
    if s.activation:
        entry["epilogue"] = s.activation  # output_error is measured before it
    oh, ow = spec.out_hw
    imgs = max(1, _MAX_ROWS // (oh * ow))
    x = ref.site_tensor(taps_per_batch[0], i)[:imgs] if taps_per_batch else None
    if x is None:
        return entry
    qmax = (1 << (plan["act_bits"] - 1)) - 1
    q, sc = cv.quantize_tensor(x, qmax, clip=plan["clip"])
    xd = q.astype(np.float32) * sc
    entry["activation_error"] = round(qmath.relative_error(x, xd), 6)
    if plan["static"]:
        entry["activation_clip"] = round(float(plan["clip"]), 6)
    y = cv.conv2d(x, w, spec, bias)
    entry["output_error"] = round(qmath.relative_error(y, cv.conv2d(xd, deq, spec, bias)), 6)
    return entry


def end_to_end(compiled, data, outs_ref, data_kind: str) -> dict:
    from ...runtime.load import host_arch

    tgt = compiled.manifest["target"]
    if tgt.get("device", "cpu") != "cpu" or tgt.get("arch") not in (None, host_arch()):
        # A cross build (an arm64 artifact compiled on x86) cannot run here; the per-layer errors stand.
        return {"skipped": f"compiled for {tgt.get('name')} ({tgt.get('arch')}), which this machine cannot run; "
                           "the per-layer errors come from the host reference"}
    cos = []
    for batch, ref in zip(data, outs_ref):
        got = compiled(*batch)
        got = list(got) if isinstance(got, (tuple, list)) else [got]
        for g, r in zip(got, ref):
            g = np.asarray(g.numpy() if hasattr(g, "numpy") else g, np.float64)
            r = np.asarray(r, np.float64)
            if g.ndim == 0 or "float" not in str(r.dtype):
                continue
            gg, rr = g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1])
            num = (gg * rr).sum(-1)
            den = np.linalg.norm(gg, axis=-1) * np.linalg.norm(rr, axis=-1)
            ok = den > 0
            cos.extend((num[ok] / den[ok]).tolist())
    if not cos:
        return {"metric": "cosine vs fp32", "mean": None, "note": "no floating-point outputs to compare"}
    return {"metric": "cosine vs fp32", "on": data_kind, "mean": round(float(np.mean(cos)), 6),
            "min": round(float(np.min(cos)), 6), "rows": len(cos)}


def format_report(report: dict) -> str:
    lines = [f"ember: quantization {report['scheme'].get('type')} — {len(report['layers'])} layers"]
    if report.get("note"):
        lines.append("  " + report["note"])
    for e in report["layers"]:
        parts = [f"  {e['layer']:<40} {e['kind']:<9} {e['bits']}-bit", f"weight err {e['weight_error']:.4f}"]
        if "activation_error" in e:
            parts.append(f"act err {e['activation_error']:.4f}")
        if "output_error" in e:
            parts.append(f"out err {e['output_error']:.4f}")
        lines.append("  ".join(parts))
    for e in report.get("fp32_convs", []):
        lines.append(f"  {e['layer']:<40} conv kept fp32: {e['reason']}")
    pb = report.get("param_bytes")
    if pb:
        lines.append(f"  params: {pb['quantized'] / 1e6:.2f} MB quantized vs {pb['fp32'] / 1e6:.2f} MB fp32 "
                     f"(x{pb['ratio']:.3f})")
    e2e = report.get("end_to_end")
    if e2e and e2e.get("mean") is not None:
        lines.append(f"  end to end: cosine vs fp32 mean {e2e['mean']:.5f}, min {e2e['min']:.5f} on {e2e['on']}")
    elif e2e and e2e.get("skipped"):
        lines.append(f"  end to end: not measured: {e2e['skipped']}")
    return "\n".join(lines)
