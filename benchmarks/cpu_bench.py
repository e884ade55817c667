"""CPU latency of ember against PyTorch eager, torch.compile and ONNX Runtime, in one run.

    python benchmarks/cpu_bench.py [--tuning-db DIR] [--workloads minilm-b1,minilm-b8,resnet18-b1]
                                   [--rounds 10] [--threads N] [--out benchmarks/results]

Workloads: all-MiniLM-L6-v2 (real weights, real sentences, seq 128) at batch 1 and 8, and a ResNet-18-style CNN
(this file's ``resnet18``: BasicBlocks [2, 2, 2, 2], random weights and BatchNorm statistics from a fixed seed)
at batch 1, 3x224x224, all fp32; optionally ``linear4096-b1`` (one nn.Linear 4096x4096: a weight-bound GEMV).
Engines: ember untuned (its rule-based schedules), ember tuned (only with
``--tuning-db``: ``ember.compile(..., tuning=ember.Tuning(database=DIR, apply_only=True))``; "n/a" if that
fails), PyTorch eager, torch.compile (inductor) and ONNX Runtime (CPU provider, all graph optimizations). Every
engine uses all the machine's cores, or ``--threads N`` each (the JSON records the threads each engine had).

How it measures: the engines of one workload run *interleaved* -- ``--rounds`` rounds, each running every
engine a few times in turn -- and the median over all rounds is reported. On a shared machine the load changes
from second to second; interleaving gives every engine the same mix of quiet and busy moments, so the ratios
stay meaningful even when absolute times move. Each engine's turn starts with one untimed call
(``benchtools.interleaved_times``' ``settle``): without it the first timed call of a turn paid for the previous
engine (cold caches, a sleeping thread pool, ONNX Runtime's threads still spinning), which inflated the median of
whichever engine followed ORT -- ember untuned, 21.3 ms median for a 13.3 ms minimum on ResNet-18 (2026-11-26).

Prints a table (latency and ratio to the fastest peer = the fastest of eager / torch.compile / ORT) plus each
ember output's agreement with PyTorch (max abs error, min cosine), and writes ``cpu_bench.json`` and
``cpu_bench.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cpu_name, interleaved_times  # noqa: E402

PEERS = ("PyTorch eager", "torch.compile", "ONNX Runtime")
ENGINES = ("ember untuned", "ember tuned", "ember no Winograd") + PEERS


# ------------------------------------------------------------------------------------------------- models
def resnet18(num_classes: int = 1000, seed: int = 0):
    """A ResNet-18-style CNN (torchvision's layout: 7x7 stem, max-pool, BasicBlocks [2, 2, 2, 2] with 64..512
    channels, global average pool, linear), eval mode, random weights and BN statistics from ``seed``."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.down = None
            if stride != 1 or c_in != c_out:
                self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            blocks, c = [], 64
            for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
                c = c_out
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(torch.mean(x, dim=(2, 3)), 1))

    torch.manual_seed(seed)
    model = ResNet18()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding BN is really exercised
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def workload(name: str):
    """(description, torch model, example inputs as a tuple of torch tensors, ONNX input names)."""
    import torch

    if name.startswith("minilm-b"):
        from ember.models import minilm
        from ember.models.corpus import stdlib_sentences

        batch = int(name[len("minilm-b"):])
        tok = minilm.load_tokenizer()
        ids, mask = minilm.tokenize(tok, stdlib_sentences(batch), minilm.SEQ_LEN)
        return (f"all-MiniLM-L6-v2, batch {batch}, seq {minilm.SEQ_LEN}", minilm.load_encoder(),
                (torch.from_numpy(ids), torch.from_numpy(mask)), ["input_ids", "attention_mask"])
    if name.startswith("resnet18-b"):
        batch = int(name[len("resnet18-b"):])
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype("float32"))
        return f"ResNet-18-style CNN, batch {batch}, 3x224x224", resnet18(), (x,), ["x"]
    if name.startswith("linear4096-b"):
        # a batch-1 dense layer is a GEMV: bound by reading its 64 MiB of weights once (issue 5's dense baseline)
        batch = int(name[len("linear4096-b"):])
        torch.manual_seed(0)
        lin = torch.nn.Linear(4096, 4096).eval()
        return (f"nn.Linear 4096x4096, batch {batch}", lin, (torch.randn(batch, 4096),), ["x"])
    raise SystemExit(f"unknown workload {name!r}; use minilm-b<N>, resnet18-b<N> or linear4096-b<N>")


# ------------------------------------------------------------------------------------------------- engines
def ember_engine(model, inputs, names, tuning_db=None, winograd=True):
    """Compile with ember; returns (run function, outputs as numpy, compile seconds). ``winograd=False``: the
    direct conv rule for every conv (ember.passes.winograd off), the before/after baseline."""
    import tvm

    import ember
    from ember.passes import winograd as wg

    kwargs = {}
    if tuning_db is not None:
        kwargs["tuning"] = ember.Tuning(database=tuning_db, apply_only=True)
    t0 = time.perf_counter()
    saved, wg.ENABLED = wg.ENABLED, winograd and wg.ENABLED
    try:
        cm = ember.compile(model, inputs, input_names=names, **kwargs)
    finally:
        wg.ENABLED = saved
    compile_s = time.perf_counter() - t0
    out = cm(*[t.numpy() for t in inputs])
    dev_inputs = [tvm.runtime.tensor(np.ascontiguousarray(t.numpy()), tvm.cpu()) for t in inputs]
    return (lambda: cm.run_device(dev_inputs)), out, compile_s


def ort_engine(model, inputs, names, threads):
    import onnxruntime as ort
    import torch

    d = tempfile.mkdtemp(prefix="ember-bench-")
    path = os.path.join(d, "model.onnx")
    torch.onnx.export(model, inputs, path, input_names=names, output_names=["out"], opset_version=17,
                      dynamo=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(names, inputs)}
    return lambda: sess.run(None, feed)


def interleaved(fns: dict, rounds: int, per_round: int, warmup: int = 3, settle: int = 1) -> dict:
    """Median ms per engine, the engines taking turns (see module docstring)."""
    times = interleaved_times(fns, rounds, per_round, warmup, settle)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "runs": len(v)} for k, v in times.items()}


def agreement(ours, ref) -> dict:
    ours = np.asarray(ours, dtype=np.float64).reshape(len(ref), -1)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-30)
    return {"max_abs_err": float(np.abs(ours - ref).max()), "min_cosine": float(cos.min()),
            "ref_max_abs": float(np.abs(ref).max())}


def run_workload(name, args, threads):
    import torch

    desc, model, inputs, names = workload(name)
    print(f"\n== {desc}", flush=True)
    with torch.inference_mode():
        ref = model(*inputs).numpy()
    fns, notes, numerics, compile_s = {}, {}, {}, {}

    variants = [("ember untuned", None, True), ("ember tuned", args.tuning_db, True)]
    if args.winograd_baseline:
        variants.append(("ember no Winograd", args.tuning_db, False))
    for label, db, wino in variants:
        if label == "ember tuned" and db is None:
            continue
        try:
            fn, out, secs = ember_engine(model, inputs, names, db, winograd=wino)
            fns[label], compile_s[label] = fn, round(secs, 1)
            numerics[label] = agreement(out, ref)
        except Exception as e:  # an engine that fails is reported in the table, not hidden
            notes[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"{label}: failed: {notes[label]}", flush=True)
            if label == "ember untuned":
                traceback.print_exc()

    def eager():
        with torch.inference_mode():
            return model(*inputs)

    fns["PyTorch eager"] = eager
    try:
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(*inputs)

        def tcompile():
            with torch.inference_mode():
                return compiled(*inputs)

        fns["torch.compile"] = tcompile
    except Exception as e:
        notes["torch.compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    try:
        fns["ONNX Runtime"] = ort_engine(model, inputs, names, threads)
    except Exception as e:
        notes["ONNX Runtime"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    per_round = max(1, args.per_round)
    timing = interleaved(fns, args.rounds, per_round)
    peers = {k: v["median_ms"] for k, v in timing.items() if k in PEERS}
    fastest = min(peers, key=peers.get) if peers else None
    rows = {}
    for engine in ENGINES:
        if engine == "ember tuned" and args.tuning_db is None:
            rows[engine] = {"status": "n/a", "note": "no --tuning-db given"}
            continue
        if engine == "ember no Winograd" and not args.winograd_baseline:
            rows[engine] = {"status": "n/a", "note": "no --winograd-baseline"}
            continue
        if engine not in timing:
            rows[engine] = {"status": "n/a", "note": notes.get(engine, "not run")}
            continue
        t = timing[engine]
        rows[engine] = {"status": "ok", **t,
                        "ratio_to_fastest_peer": t["median_ms"] / peers[fastest] if fastest else None}
        if engine in numerics:
            rows[engine]["numerics_vs_torch"] = numerics[engine]
            rows[engine]["compile_seconds"] = compile_s[engine]
    return {"workload": name, "description": desc, "fastest_peer": fastest, "engines": rows}


# ------------------------------------------------------------------------------------------------- report

def print_table(results):
    for res in results:
        print(f"\n{res['description']}  (fastest peer: {res['fastest_peer']})")
        print(f"  {'engine':16s} {'median ms':>10s} {'min ms':>9s} {'x fastest peer':>15s}  numerics vs torch")
        for engine, row in res["engines"].items():
            if row["status"] != "ok":
                print(f"  {engine:16s} {'n/a':>10s} {'':>9s} {'':>15s}  {row.get('note', '')}")
                continue
            num = row.get("numerics_vs_torch")
            num_s = (f"max abs err {num['max_abs_err']:.2e}, min cosine {num['min_cosine']:.7f}" if num else "")
            print(f"  {engine:16s} {row['median_ms']:10.2f} {row['min_ms']:9.2f} "
                  f"{row['ratio_to_fastest_peer']:14.2f}x  {num_s}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ENGINES)
    xs = np.arange(len(results))
    for i, engine in enumerate(ENGINES):
        vals = [r["engines"][engine].get("ratio_to_fastest_peer") or 0.0 for r in results]
        bars = ax.bar(xs + (i - (len(ENGINES) - 1) / 2) * width, vals, width, label=engine)
        for b, r in zip(bars, results):
            row = r["engines"][engine]
            label = f"{row['median_ms']:.1f}" if row["status"] == "ok" else "n/a"
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02, label, ha="center", va="bottom",
                    fontsize=7, rotation=90)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["description"] for r in results], fontsize=8)
    ax.set_ylabel("latency / fastest peer (lower is better)")
    ax.set_title(f"CPU latency, {cpu_name()}, {os.cpu_count()} cores (bar labels: median ms)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tuning-db", default=None, help="a tuning database directory: adds the 'ember tuned' column")
    ap.add_argument("--workloads", default="minilm-b1,minilm-b8,resnet18-b1")
    ap.add_argument("--winograd-baseline", action="store_true",
                    help="adds 'ember no Winograd' (direct conv rule everywhere; with --tuning-db, tuned too)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds per workload")
    ap.add_argument("--per-round", type=int, default=3, help="runs of each engine per round")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for every engine (default: all cores). --threads 1 compares the kernels' work per "
                         "core, which a machine shared with other jobs distorts less than the multi-thread figures")
    a = ap.parse_args()
    if a.tuning_db is not None and not os.path.isdir(a.tuning_db):
        raise SystemExit(f"--tuning-db {a.tuning_db}: no such directory")

    threads = a.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if a.threads:
        # TVM sizes its pool when a thread first runs parallel work: set it before ember/TVM run anything
        os.environ["TVM_NUM_THREADS"] = str(threads)

    import torch

    import ember

    torch.set_num_threads(threads)
    results = [run_workload(w.strip(), a, threads) for w in a.workloads.split(",") if w.strip()]
    print_table(results)

    os.makedirs(a.out, exist_ok=True)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": threads, "llvm_mcpu": _mcpu(),
                    "threads": {"ember (TVM pool)": _tvm_threads(), "torch": torch.get_num_threads(),
                                "onnxruntime": threads},
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {"ember": ember.__version__, "torch": torch.__version__, "tvm": __import__("tvm").__version__,
                     "onnxruntime": _version("onnxruntime")},
        "method": f"median over {a.rounds} interleaved rounds x {a.per_round} runs per engine (after 1 untimed "
                  "call at the start of each engine's turn)",
        "results": results,
    }
    jpath, ppath = os.path.join(a.out, "cpu_bench.json"), os.path.join(a.out, "cpu_bench.png")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=2)
    plot(results, ppath)
    print(f"\nwrote {jpath} and {ppath}")


def _tvm_threads():
    try:
        return int(__import__("tvm").get_global_func("runtime.NumThreads")())
    except Exception:  # pylint: disable=broad-except
        return None


def _mcpu():
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu())
    except Exception:  # pylint: disable=broad-except
        return None


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
        return None


if __name__ == "__main__":
    main()
