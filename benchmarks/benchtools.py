"""Helpers every benchmark script shares: the machine's name and fair timing under a drifting load.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they import it as
``benchtools``.
"""

from __future__ import annotations

import platform
import time


def cpu_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_times(fns: dict, rounds: int, per_round: int, warmup: int = 3,
                      settle: int = 0) -> dict[str, list[float]]:
    """Milliseconds per call of each function, the functions taking turns round by round.

    On a shared machine the load changes from second to second; taking turns gives every engine the same mix of
    quiet and busy moments, so the ratios between engines stay meaningful even when the absolute times swing.
    ``settle``: untimed calls at the start of each engine's turn. The first call after another engine ran finds
    that engine's data in the caches, its own thread pool asleep and, after ONNX Runtime, ORT's worker threads
    still spinning on both cores; a serving loop calls one engine back to back and never sees that.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(settle):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def cuda_events_us(fn, iters: int = 200, warmup: int = 20, reps: int = 3, reduce: str = "min") -> float:
    """Microseconds per call of ``fn()`` issued back to back, from CUDA events around ``iters`` calls (launches
    overlap, as in a serving loop); ``reps`` such batches reduced by "min" or "median"."""
    import numpy as np
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return float(min(times) if reduce == "min" else np.median(times))


def cuda_kernel_times(fn, calls: int = 20, warmup: int = 1) -> list[tuple[str, float, float]]:
    """GPU time per kernel name over ``calls`` calls of ``fn()`` (torch.profiler's CUDA activities: CUPTI sees TVM's
    kernels too): ``(name[:80], launches per call, us per call)``, largest time first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            key = ev.name[:80]
            n, t = per.get(key, (0, 0.0))
            per[key] = (n + 1, t + ev.time_range.elapsed_us())
    return sorted(((k, n / calls, t / calls) for k, (n, t) in per.items()), key=lambda r: -r[2])


def cuda_median_ms(fn, repeat: int, warmup: int) -> float:
    """Median wall-clock ms of ``fn()`` on the GPU: synchronized after every call, so queued work is counted."""
    import numpy as np
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


# The all-MiniLM-L6-v2 architecture with a small vocabulary: random weights that both the build machine and the
# GPU machine create alike (seeded), so the GPU benchmarks need not carry the real weights.
MINILM_CONFIG = dict(vocab_size=1024, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)


def minilm_arch(attn_implementation: str | None = None):
    """torch module (input_ids, attention_mask) -> last hidden state, MiniLM-L6 architecture, seed 0.

    attn_implementation: transformers' attention ("eager": matmul, softmax, matmul; None: its default)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(**MINILM_CONFIG)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation  # pylint: disable=protected-access
    bert = BertModel(cfg, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    return Encoder(bert).eval()


def prepare_run_parser(doc: str, run_out_required: bool = False):
    """The two-step command line of the GPU benchmarks: ``prepare --out DIR [--target T]`` here (compile, no GPU)
    and ``run DIR [--out OUT]`` on the device. Returns (parser, subparsers action, prepare subparser, run subparser):
    the script adds its own options and any further step; ``cmd`` says which step was asked for."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--out", required=True)
    prep.add_argument("--target", default="cuda-sm90")
    run = sub.add_parser("run")
    run.add_argument("dir")
    run.add_argument("--out", **({"required": True} if run_out_required else {"default": "."}))
    return ap, sub, prep, run
