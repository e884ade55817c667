"""Tuning throughput: valid MetaSchedule trials per minute on one matmul task, by builder.

    .venv/bin/python benchmarks/tune_throughput.py [--trials 128] [--builders pool,inprocess,stock]

The task is MiniLM's FFN up-projection as ember compiles it (x[128, 384] @ W[384, 1536] + b, fused), tuned from
an empty database with ember's default search settings and the XGBoost cost model. For each builder the script
prints valid trials per minute of tuning (model preparation excluded), where the time went (evolutionary search,
builds, cost-model training, measurement + the rest), and the best latency found; it writes
benchmarks/results/tune_throughput.json. "stock" is MetaSchedule's own LocalBuilder (a new worker pool per batch,
every worker importing all tensor intrinsics, 30 s timeout); it gets one small batch, which shows the problem.
Record the machine load (printed) next to the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=128, help="trials per builder (stock: --stock-trials)")
    ap.add_argument("--stock-trials", type=int, default=4)
    ap.add_argument("--trials-per-iter", type=int, default=64)
    ap.add_argument("--builders", default="pool,inprocess,stock")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tune_throughput.json"))
    a = ap.parse_args()

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
