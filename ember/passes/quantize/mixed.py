"""Mixed 4/8-bit weight-only quantization: per-layer bit widths from measured sensitivity, within a budget.

Sensitivity of a layer = the end-to-end drop (1 - mean cosine vs fp32 on the calibration data) when only that
layer's weights are INT4 (group-wise) and the rest stay fp32, measured by running the fp32 reference module with
that layer's weight replaced by its dequantized INT4 version (exact simulation of the weight-only kernels up to
fp32 summation order; no recompilation). Layers are then ordered from least to most sensitive per byte saved,
and the longest prefix that can go to INT4 — every other layer INT8 — while the *simulated whole-model* drop
stays ≤ ``budget`` is found by bisection (the drop grows with the prefix, up to noise; each probe is a real
simulation, so the chosen assignment's drop is measured, not estimated).
"""

from __future__ import annotations

import time

import numpy as np

from . import qmath
from .report import progress

_MAX_BATCHES = 8  # calibration batches used per sensitivity probe


def _drop(ref, data, outs_ref, weights) -> float:
    cos = []
    for batch, ref_out in zip(data, outs_ref):
        got, _ = ref.run(batch, weights)
        for g, r in zip(got, ref_out):
            if "float" in str(r.dtype) and r.ndim:
                cos.append(qmath.cosine(r, g))
    return 1.0 - float(np.mean(cos)) if cos else 0.0


def _fake(site, ref, bits, group):
    w = ref.weights[site.weight_index].astype(np.float32)
    g = group if site.k % group == 0 else -1
    if site.kind == "embedding":
        _, deq = qmath.embedding_pack(w, bits, g, True)
        return deq
    wkn = w.T if site.transposed else w
    _, deq = qmath.weight_only_pack(wkn, bits, g, True)
    return np.ascontiguousarray(deq.T if site.transposed else deq)


def choose_bits(cfg, sites, ref, data, outs_ref, verbose):
    t0 = time.perf_counter()
    probe_data, probe_ref = data[:_MAX_BATCHES], outs_ref[:_MAX_BATCHES]
    w4 = {s.name: _fake(s, ref, 4, cfg.group_size) for s in sites}
    w8 = {s.name: _fake(s, ref, 8, cfg.group_size) for s in sites}
    sens = {}
    for i, s in enumerate(sites):
        sens[s.name] = _drop(ref, probe_data, probe_ref, {s.weight_index: w4[s.name]})
        if verbose:
            progress("measuring layer sensitivity", i + 1, len(sites), t0)
    saved = {s.name: max(s.k * s.n, 1) for s in sites}  # bytes saved by going 8 → 4 bits, up to a constant
    order = sorted(sites, key=lambda s: (sens[s.name] / saved[s.name], s.name))

    def assignment(n4):
        four = {s.name for s in order[:n4]}
        return {s.name: 4 if s.name in four else 8 for s in sites}

    def weights_for(bits):
        return {s.weight_index: (w4 if bits[s.name] == 4 else w8)[s.name] for s in sites}

    lo, hi = 0, len(order)
    drops = {}

    def measured(n4):
        if n4 not in drops:
            drops[n4] = _drop(ref, data, outs_ref, weights_for(assignment(n4)))
        return drops[n4]

    if measured(hi) <= cfg.budget:
        best = hi
    else:
        best = 0
        while lo < hi - 1:  # invariant: drop(lo) within budget (or lo = 0), drop(hi) over it
            mid = (lo + hi) // 2
            if measured(mid) <= cfg.budget:
                lo, best = mid, mid
            else:
                hi = mid
    bits = assignment(best)
    extra = {"mixed": {"budget": cfg.budget, "int4_layers": best, "int8_layers": len(sites) - best,
                       "simulated_drop": round(measured(best), 6),
                       "sensitivity": {k: round(v, 6) for k, v in sens.items()}}}
    if measured(best) > cfg.budget:
        extra["mixed"]["note"] = ("even all-INT8 weights exceed the budget on this data; every layer is INT8")
    return bits, extra
