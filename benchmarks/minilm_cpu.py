"""MiniLM on this machine's CPU: ember vs PyTorch eager (and ONNX Runtime, torch.compile with --peers all).

    python benchmarks/minilm_cpu.py [--batch 1] [--seq 128] [--peers eager|all] [--out benchmarks/out] [--profile]

Prints a table of median latencies and the ratio to PyTorch eager, and writes JSON with the machine named.
All engines run in this one process, one after another, on the same inputs (real sentences).
``--profile`` also prints where ember's time goes, kernel by kernel (see :func:`profile_kernels`).
For the full comparison (torch.compile, ONNX Runtime, batch 8, a CNN) see benchmarks/cpu_bench.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cpu_name  # noqa: E402


def median_ms(fn, warmup=5, repeat=30, min_seconds=1.0):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), len(times)


def profile_kernels(compiled, inputs, runs: int = 5, top: int = 20):
    """Time every call the Relax VM makes (TIR kernels and VM builtins) with the VM's instrument hook; print the
    per-kernel minimum over ``runs`` runs, kernels of the same kind (names differing only in digits) summed.
    The minimum is the robust statistic on a shared machine; the sum of minima is a lower bound of a run."""
    import collections
    import re

    import tvm
    from tvm.runtime.vm import VirtualMachine

    compiled._vm()  # moves the weights to the device
    vm = VirtualMachine(compiled._executable, tvm.cpu())
    dev_inputs = [tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()) for x in inputs]
    acc, calls, start = collections.defaultdict(float), collections.Counter(), {}

    def instrument(_func, symbol, before, _ret, *_args):
        if before:
            start[symbol] = time.perf_counter()
        else:
            acc[symbol] += time.perf_counter() - start[symbol]
            calls[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm["main"](*dev_inputs, *compiled._params)
    per_run = []
    for _ in range(runs):
        acc.clear()
        calls.clear()
        vm["main"](*dev_inputs, *compiled._params)
        per_run.append((dict(acc), dict(calls)))
    best = {k: min(r[0].get(k, 0.0) for r in per_run) for k in per_run[0][0]}
    kinds, kind_calls = collections.defaultdict(float), collections.Counter()
    for k, v in best.items():
        kind = re.sub(r"\d+", "", k)
        kinds[kind] += v
        kind_calls[kind] += per_run[0][1][k]
    print(f"\nember kernels (min over {runs} runs, kinds summed; total {sum(best.values()) * 1e3:.2f} ms)")
    for kind, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v * 1e3:8.2f} ms  {kind_calls[kind]:4d} calls  {kind}")
    return {k: v * 1e3 for k, v in kinds.items()}



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--peers", choices=["eager", "all"], default="all")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--profile", action="store_true", help="also print ember's time per kernel")
    a = ap.parse_args()

    import torch

    import ember
    from ember.models import minilm
    from ember.models.corpus import stdlib_sentences

    tok = minilm.load_tokenizer()
    ids, mask = minilm.tokenize(tok, stdlib_sentences(a.batch), a.seq)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    encoder = minilm.load_encoder()
    rows = {}
    with torch.inference_mode():
        ref = encoder(t_ids, t_mask).numpy()
        rows["PyTorch eager"] = median_ms(lambda: encoder(t_ids, t_mask))

    t0 = time.perf_counter()
    compiled, _ = minilm.compile_encoder(encoder=encoder, batch=a.batch, seq_len=a.seq)
    compile_s = time.perf_counter() - t0
    ours = compiled(ids, mask)
    cos = float(((ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))).min())
    b = compiled.benchmark(ids, mask, repeat=30, min_seconds=1.0)
    rows["ember (untuned)"] = (b.median_ms, b.runs)
    kernel_ms = profile_kernels(compiled, (ids, mask)) if a.profile else None

    if a.peers == "all":
        import tempfile

        try:
            import onnxruntime as ort

            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "m.onnx")
                torch.onnx.export(encoder, (t_ids, t_mask), path, input_names=["ids", "mask"],
                                  output_names=["emb"], opset_version=17, dynamo=False)
                so = ort.SessionOptions()
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                rows["ONNX Runtime"] = median_ms(lambda: sess.run(None, {"ids": ids, "mask": mask}))
        except Exception as e:  # a peer that fails is reported, not hidden
            print(f"ONNX Runtime failed: {e}")
        try:
            compiled_t = torch.compile(encoder)
            with torch.inference_mode():
                compiled_t(t_ids, t_mask)
                rows["torch.compile (inductor)"] = median_ms(lambda: compiled_t(t_ids, t_mask))
        except Exception as e:
            print(f"torch.compile failed: {e}")

    eager = rows["PyTorch eager"][0]
    print(f"\nall-MiniLM-L6-v2 fp32, batch {a.batch}, seq {a.seq} — {cpu_name()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'engine':28s} {'median ms':>10s} {'vs eager':>9s} {'runs':>6s}")
    for k, (ms, n) in rows.items():
        print(f"{k:28s} {ms:10.2f} {ms / eager:8.2f}x {n:6d}")
    print(f"ember compile time {compile_s:.1f} s; min cosine vs torch {cos:.6f}")
    os.makedirs(a.out, exist_ok=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {"ember": ember.__version__, "torch": torch.__version__,
                     "tvm": __import__("tvm").__version__},
        "batch": a.batch, "seq": a.seq, "compile_seconds": compile_s, "min_cosine": cos,
        "median_ms": {k: v[0] for k, v in rows.items()},
        "ember_kernel_ms": kernel_ms,
    }
    path = os.path.join(a.out, f"minilm_cpu_b{a.batch}_s{a.seq}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
