"""Winograd vs the direct conv rule, per ResNet-18 3x3 stride-1 layer shape, on this CPU.

    python benchmarks/winograd_bench.py [--rounds 6] [--shapes 56x64,28x128,14x256,7x512] [--out benchmarks/results]

Each shape is a small model ``relu(conv3x3(x) + b)`` (batch 1, C = O channels, padding 1) compiled three ways by
ember -- direct (``EMBER_WINOGRAD`` off: the packed NHWC conv of ember.schedules.cpu.matmul), Winograd F(2x2, 3x3)
and F(4x4, 3x3) -- plus ONNX Runtime on the same model. The engines of one shape run interleaved, ``--rounds``
rounds, median reported (see cpu_bench.py for why). The ratios decide ember.passes.winograd.choose_tile.
Writes ``winograd_bench.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _model(c: int):
    import torch

    class ConvReLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(c, c, 3, 1, 1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    torch.manual_seed(0)
    return ConvReLU().eval()


def _compile(model, x, m):
    import ember
    from ember.passes import winograd

    saved = (winograd.ENABLED, winograd.choose_tile)
    try:
        winograd.ENABLED = m is not None
        winograd.choose_tile = lambda *_: m
        return ember.compile(model, (x,), input_names=["x"])
    finally:
        winograd.ENABLED, winograd.choose_tile = saved


def run_shape(hw: int, c: int, rounds: int) -> dict:
    import torch
    import tvm

    from cpu_bench import ort_engine

    model = _model(c)
    x = torch.randn(1, c, hw, hw)
    ref = model(x).detach().numpy()
    xi = tvm.runtime.tensor(x.numpy(), tvm.cpu())
    fns, errs = {}, {}
    for label, m in (("direct", None), ("F(2x2,3x3)", 2), ("F(4x4,3x3)", 4)):
        cm = _compile(model, x, m)
        errs[label] = float(np.abs(cm(x.numpy()) - ref).max() / np.abs(ref).max())
        fns[label] = lambda cm=cm: cm.run_device([xi])
    fns["ONNX Runtime"] = ort_engine(model, (x,), ["x"], os.cpu_count())
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(3):
                f()
            for _ in range(10):
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": f"{hw}x{hw}x{c}->{c}", "median_ms": med, "max_rel_err": errs,
            "vs_direct": {k: med[k] / med["direct"] for k in med}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--shapes", default="56x64,28x128,14x256,7x512")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args()
    results = []
    for spec in a.shapes.split(","):
        hw, c = (int(v) for v in spec.split("x"))
        r = run_shape(hw, c, a.rounds)
        results.append(r)
        print(f"{r['shape']:>16s}  " + "  ".join(f"{k} {v:7.3f} ms ({r['vs_direct'][k]:.2f}x)"
                                               for k, v in r["median_ms"].items()), flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "winograd_bench.json"), "w") as f:
        json.dump({"results": results, "loadavg": load, "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)


if __name__ == "__main__":
    main()
