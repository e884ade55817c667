"""Tuning throughput: valid MetaSchedule trials per minute on one matmul task, by builder.

    .venv/bin/python benchmarks/tune_throughput.py [--trials 128] [--builders pool,inprocess,stock]
    .venv/bin/python benchmarks/tune_throughput.py --minilm-minutes 15 [--db tuning]

The task is MiniLM's FFN up-projection as ember compiles it (x[128, 384] @ W[384, 1536] + b, fused), tuned from
an empty database with ember's default search settings and the XGBoost cost model. For each builder the script
prints valid trials per minute of tuning (model preparation excluded), where the time went (evolutionary search,
builds, cost-model training, measurement + the rest), and the best latency found; it writes
benchmarks/results/tune_throughput.json. "stock" is MetaSchedule's own LocalBuilder (a new worker pool per batch,
every worker importing all tensor intrinsics, 30 s timeout); it gets one small batch, which shows the problem.
Record the machine load (printed) next to the figures: the machine is shared.

--minilm-minutes M instead tunes all-MiniLM-L6-v2 (batch 1, seq 128, real weights) for M minutes into --db
(default: the repo's tuning/, resumed if it has records), then measures in this one process, on real sentences:
PyTorch eager, ONNX Runtime, ember untuned and ember compiled with the database, and writes
benchmarks/results/tune_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def minilm(a):
    import torch

    import ember
    from ember.models import minilm as mm
    from ember.models.corpus import stdlib_sentences
    from ember.schedules.tune import tune

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchtools import cpu_name  # pylint: disable=import-outside-toplevel
    from minilm_cpu import median_ms  # pylint: disable=import-outside-toplevel

    encoder = mm.load_encoder()
    ids, mask = mm.tokenize(mm.load_tokenizer(), stdlib_sentences(1), 128)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    example = (torch.ones((1, 128), dtype=torch.int64), torch.ones((1, 128), dtype=torch.int64))
    load0 = os.getloadavg()[0]
    if a.measure_only:  # tuned before (e.g. `ember tune minilm --minutes M --db tuning`): report what the db holds
        r = {"seconds": None, "note": "tuned in an earlier run; see BENCHMARKS.md", "tasks": []}
    else:
        r = tune(encoder, "host", ember.Tuning(minutes=a.minilm_minutes, database=a.db, seed=0),
                 example_inputs=example).to_json()
    print(json.dumps({k: v for k, v in r.items() if k != "tasks"}))
    for t in r["tasks"]:
        print(f"  {t['name'][:56]:56s} x{t['weight']:<3g} {t['trials']:4d} trials  best {t['best_ms']} ms  "
              f"rules {t['rules_ms']} ms")
    rows = {}
    with torch.inference_mode():
        ref = encoder(t_ids, t_mask).numpy()
        rows["PyTorch eager"] = median_ms(lambda: encoder(t_ids, t_mask))[0]
    try:
        import tempfile

        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            torch.onnx.export(encoder, (t_ids, t_mask), path, input_names=["ids", "mask"], output_names=["emb"],
                              opset_version=17, dynamo=False)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            rows["ONNX Runtime"] = median_ms(lambda: sess.run(None, {"ids": ids, "mask": mask}))[0]
    except Exception as e:  # a peer that fails is reported, not hidden
        print(f"ONNX Runtime failed: {e}")
    cos = {}
    for label, tuning in [("ember untuned", None),
                          ("ember tuned", ember.Tuning(database=a.db, apply_only=True))]:
        cm = ember.compile(encoder, example, tuning=tuning)
        out = cm(ids, mask)
        cos[label] = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
        rows[label] = cm.benchmark(ids, mask, repeat=30, min_seconds=1.0).median_ms
        if tuning is not None:
            print(f"tuned kernels used: {cm.manifest['tuning'].get('tuned_kernels')} of "
                  f"{cm.manifest['tuning'].get('kernels')}")
            applied = cm.manifest["tuning"]
    best = min(v for k, v in rows.items() if not k.startswith("ember"))
    print(f"\nall-MiniLM-L6-v2 fp32, batch 1, seq 128, {cpu_name()}; tuned {r['seconds']} s, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for k, v in rows.items():
        print(f"{k:18s} {v:8.2f} ms  {v / best:5.2f}x fastest peer" + (f"  cos {cos[k]:.6f}" if k in cos else ""))
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "median_ms": rows, "cosine_vs_torch": cos,
           "tuning": r, "applied": applied, "load_before": load0, "load_after": os.getloadavg()[0]}
    path = os.path.join(os.path.dirname(a.out), "tune_minilm.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=128, help="trials per builder (stock: --stock-trials)")
    ap.add_argument("--stock-trials", type=int, default=4)
    ap.add_argument("--trials-per-iter", type=int, default=64)
    ap.add_argument("--builders", default="pool,inprocess,stock")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tune_throughput.json"))
    ap.add_argument("--minilm-minutes", type=float, help="tune MiniLM for this long instead (see above)")
    ap.add_argument("--measure-only", action="store_true", help="with --minilm-minutes: skip tuning, measure")
    ap.add_argument("--db", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "tuning"), help="database root for --minilm-minutes")
    a = ap.parse_args()
    if a.minilm_minutes:
        return minilm(a)

    import torch

    import ember
    from ember.schedules.tune import tune

    torch.manual_seed(0)
    model = torch.nn.Linear(384, 1536).eval()
    x = torch.randn(128, 384)
    rows = []
    for builder in a.builders.split(","):
        trials = a.stock_trials if builder == "stock" else a.trials
        load0 = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as db:
            t0 = time.monotonic()
            r = tune(model, "host", ember.Tuning(trials=trials, trials_per_iter=min(a.trials_per_iter, trials),
                                                 database=db, seed=0, builder=builder), example_inputs=(x,))
            wall = time.monotonic() - t0
        tuning_s = r.seconds - r.phases.get("prepare", 0.0)
        row = {"builder": builder, "trials": r.trials, "valid": r.valid, "tuning_seconds": round(tuning_s, 1),
               "valid_per_minute": round(60.0 * r.valid / tuning_s, 1) if tuning_s > 0 else None,
               "phases": {k: round(v, 1) for k, v in r.phases.items()},
               "best_ms": None if r.tasks[0].best_ms is None else round(r.tasks[0].best_ms, 4),
               "wall_seconds": round(wall, 1), "load_before": round(load0, 2),
               "load_after": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'builder':10s} {'trials':>6s} {'valid':>5s} {'tuning s':>8s} {'valid/min':>9s} {'best ms':>8s}  phases")
    for r in rows:
        print(f"{r['builder']:10s} {r['trials']:6d} {r['valid']:5d} {r['tuning_seconds']:8.1f} "
              f"{r['valid_per_minute'] or 0:9.1f} {r['best_ms'] or float('nan'):8.4f}  {r['phases']}")
    from tvm.target import codegen

    out = {"date": time.strftime("%Y-%m-%d"), "cpu": str(codegen.llvm_get_system_cpu()),
           "cores": len(os.sched_getaffinity(0)), "task": "x[128,384] @ W[384,1536] + b (fp32)", "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
