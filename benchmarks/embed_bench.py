"""Embedding a MiniLM artifact in an app: latency from C++ vs Python, and resident memory vs PyTorch.

    flock /tmp/ember-bench.lock python benchmarks/embed_bench.py [--artifact DIR] [--rounds 3] [--out DIR]

1. Latency, batch 1, seq 128, real sentences: the same artifact run by the C++ example (examples/cpp, built here
   with cmake) and by Python `ember.load` (runtime-only: TVM_USE_RUNTIME_LIB=1, torch hidden), plus PyTorch
   eager on the same inputs for scale. Each engine runs in a fresh process; rounds alternate the engines so
   load from other processes hits them alike; the figure is the median over rounds of each round's median.
   The three outputs are compared with each other.
2. Resident memory (RSS, psutil / /proc), each in a fresh process: the process before the model (baseline),
   after loading it, after one call, after 8 threads called it at once, and the peak; for ember in Python, the
   C++ app and PyTorch holding the same model. "Weights once" is checked by the RSS a load adds against the
   weight bytes in the manifest, and by the RSS that 8 concurrent threads add afterwards.

Prints a table and writes JSON under benchmarks/results/ (embed_<date>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cpu_name  # noqa: E402

# Children print one JSON line last. They measure themselves: RSS via psutil, peak via /proc (VmHWM).
CHILD_PRELUDE = r"""
import importlib.abc, json, os, sys, threading, time
if os.environ.get("EMBER_BENCH_HIDE_TORCH") == "1":
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is hidden: an app that ships artifacts has no torch")
    sys.meta_path.insert(0, NoTorch())
import numpy as np, psutil
proc = psutil.Process()
mib = lambda: proc.memory_info().rss / 2**20
def peak():
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into a forked child's ru_maxrss across exec.
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
def median_ms(fn, warmup, repeat, min_s):
    for _ in range(warmup):
        fn()
    t, start = [], time.perf_counter()
    while len(t) < repeat or (time.perf_counter() - start < min_s and len(t) < 100 * repeat):
        t0 = time.perf_counter(); fn(); t.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(t)), len(t)
def eight_threads(fn):
    ts = [threading.Thread(target=lambda: [fn() for _ in range(5)]) for _ in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
art, ids_path, mask_path, out_path, warmup, repeat, min_s = sys.argv[1:8]
warmup, repeat, min_s = int(warmup), int(repeat), float(min_s)
ids, mask = np.load(ids_path), np.load(mask_path)
"""

CHILD_EMBER = CHILD_PRELUDE + r"""
import tvm  # the runtime library (TVM_USE_RUNTIME_LIB=1); counted in the baseline, as an app has it loaded
import ember
if os.environ.get("EMBER_BENCH_COPY_WEIGHTS") == "1":  # the behaviour before the fix: copy weights on first use
    from ember.runtime.module import CompiledModel
    CompiledModel._place = lambda self, p, tvm: p.copyto(self._dev)
r = {"baseline_mib": mib(), "torch_loaded": "torch" in sys.modules}
m = ember.load(art)
r["loaded_mib"] = mib()
out = m(ids, mask)
r["one_call_mib"] = mib()
r["peak_before_threads_mib"] = peak()
eight_threads(lambda: m(ids, mask))
r["eight_threads_mib"] = mib()
r["peak_mib"] = peak()
if repeat:
    r["median_ms"], r["runs"] = median_ms(lambda: m(ids, mask), warmup, repeat, min_s)
    res = m.benchmark(ids, mask, warmup=warmup, repeat=repeat, min_seconds=min_s)
    r["median_ms_device_inputs"] = res.median_ms  # inputs already on the device: what ember_run times
np.save(out_path, out)
print(json.dumps(r))
"""

CHILD_TORCH = CHILD_PRELUDE + r"""
import torch, transformers  # counted in the baseline, as a PyTorch app has them loaded
from ember.models import minilm
torch.set_grad_enabled(False)
r = {"baseline_mib": mib()}
enc = minilm.load_encoder()
r["loaded_mib"] = mib()
ti, tm = torch.from_numpy(ids), torch.from_numpy(mask)
out = enc(ti, tm).numpy()
r["one_call_mib"] = mib()
r["peak_before_threads_mib"] = peak()
eight_threads(lambda: enc(ti, tm))
r["eight_threads_mib"] = mib()
r["peak_mib"] = peak()
r["torch_threads"] = torch.get_num_threads()
if repeat:
    r["median_ms"], r["runs"] = median_ms(lambda: enc(ti, tm), warmup, repeat, min_s)
np.save(out_path, out)
print(json.dumps(r))
"""


def run_child(code: str, args, env_extra=None) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_cpp(exe, art, ids_path, mask_path, out_dir, warmup, repeat, min_s) -> dict:
    res = subprocess.run([str(exe), art, "--input", f"input_ids={ids_path}", "--input", f"attention_mask={mask_path}",
                          "--output-dir", out_dir, "--warmup", str(warmup), "--repeat", str(repeat),
                          "--min-seconds", str(min_s), "--json"], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"ember_run failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def build_cpp(build_dir: str) -> str:
    from ember.runtime.embed import embed_info

    info = embed_info()
    exe = os.path.join(build_dir, "ember_run")
    configure, build = info.cmake_commands(build_dir)
    for cmd in (configure, build):
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return exe



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=os.path.join(ROOT, "benchmarks", "out", "embed", "minilm-b1-s128"),
                    help="MiniLM artifact (batch 1, seq 128); compiled here when missing")
    ap.add_argument("--rounds", type=int, default=3, help="latency rounds, engines alternating (default 3)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()

    import numpy as np

    from ember.models import minilm
    from ember.models.corpus import stdlib_sentences

    if not os.path.isfile(os.path.join(a.artifact, "manifest.json")):
        print(f"compiling MiniLM (batch 1, seq 128) into {a.artifact} ...", flush=True)
        cm, _ = minilm.compile_encoder(batch=1, seq_len=128)
        cm.export(a.artifact)
    manifest = json.load(open(os.path.join(a.artifact, "manifest.json")))
    weight_mib = manifest["params"]["bytes"] / 2**20

    work = tempfile.mkdtemp(prefix="ember-embed-bench-")
    ids, mask = minilm.tokenize(minilm.load_tokenizer(), stdlib_sentences(1), 128)
    ids_p, mask_p = os.path.join(work, "ids.npy"), os.path.join(work, "mask.npy")
    np.save(ids_p, ids)
    np.save(mask_p, mask)
    print("building examples/cpp ...", flush=True)
    exe = build_cpp(os.path.join(ROOT, "benchmarks", "out", "embed", "build"))
    ember_env = {"TVM_USE_RUNTIME_LIB": "1", "EMBER_BENCH_HIDE_TORCH": "1"}
    load_before = os.getloadavg()

    # -- latency: rounds alternate C++, Python ember, torch --------------------------------------------------
    lat = {"cpp": [], "ember_python": [], "ember_python_device_inputs": [], "torch_eager": []}
    outs = {}
    for r in range(a.rounds):
        cpp = run_cpp(exe, a.artifact, ids_p, mask_p, work, 5, a.repeat, a.min_seconds)
        lat["cpp"].append(cpp["median_ms"])
        py = run_child(CHILD_EMBER, [a.artifact, ids_p, mask_p, os.path.join(work, "py.npy"), 5, a.repeat,
                                     a.min_seconds], ember_env)
        lat["ember_python"].append(py["median_ms"])
        lat["ember_python_device_inputs"].append(py["median_ms_device_inputs"])
        th = run_child(CHILD_TORCH, [a.artifact, ids_p, mask_p, os.path.join(work, "torch.npy"), 5, a.repeat,
                                     a.min_seconds])
        lat["torch_eager"].append(th["median_ms"])
        print(f"round {r + 1}: C++ {cpp['median_ms']:.2f} ms, Python {py['median_ms']:.2f} ms "
              f"(device inputs {py['median_ms_device_inputs']:.2f}), torch {th['median_ms']:.2f} ms", flush=True)
    outs = {k: np.load(os.path.join(work, f)) for k, f in
            (("cpp", "embedding.npy"), ("python", "py.npy"), ("torch", "torch.npy"))}
    agreement = {"cpp_vs_python_max_abs": float(np.abs(outs["cpp"] - outs["python"]).max()),
                 "cpp_vs_torch_max_abs": float(np.abs(outs["cpp"] - outs["torch"]).max())}

    # -- memory: fresh processes, no timing loop -------------------------------------------------------------
    mem = {
        "ember_python": run_child(CHILD_EMBER, [a.artifact, ids_p, mask_p, os.path.join(work, "m1.npy"), 0, 0, 0],
                                  ember_env),
        "ember_python_copying_weights": run_child(
            CHILD_EMBER, [a.artifact, ids_p, mask_p, os.path.join(work, "m2.npy"), 0, 0, 0],
            dict(ember_env, EMBER_BENCH_COPY_WEIGHTS="1")),
        "torch_eager": run_child(CHILD_TORCH, [a.artifact, ids_p, mask_p, os.path.join(work, "m3.npy"), 0, 0, 0]),
    }
    cpp_mem = run_cpp(exe, a.artifact, ids_p, mask_p, work, 0, 1, 0)
    mem["cpp"] = {"one_call_mib": cpp_mem["rss_mib"], "peak_mib": cpp_mem["peak_rss_mib"]}
    load_after = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in lat.items()}
    e = mem["ember_python"]
    checks = {
        "weights_mib": weight_mib,
        "load_adds_mib": e["loaded_mib"] - e["baseline_mib"],
        "eight_threads_add_mib": e["eight_threads_mib"] - e["one_call_mib"],
        "torch_hidden_in_ember_child": not e["torch_loaded"],
    }
    print()
    print(f"MiniLM-L6 (real weights), batch 1, seq 128, {cpu_name()}, load {load_before[0]:.1f}->{load_after[0]:.1f}")
    print(f"{'engine':42s} {'median ms':>10s} {'vs C++':>7s}")
    names = {"cpp": "ember, C++ app (examples/cpp)", "ember_python": "ember, Python ember.load (numpy in/out)",
             "ember_python_device_inputs": "ember, Python, inputs already on device",
             "torch_eager": "PyTorch eager (same inputs)"}
    for k, v in med.items():
        print(f"{names[k]:42s} {v:10.2f} {v / med['cpp']:7.2f}")
    print(f"outputs: C++ vs Python max abs {agreement['cpp_vs_python_max_abs']:.2e}, "
          f"C++ vs torch {agreement['cpp_vs_torch_max_abs']:.2e}")
    print()
    print(f"{'resident memory (MiB)':38s} {'baseline':>9s} {'loaded':>8s} {'1 call':>8s} {'peak 1':>8s} "
          f"{'8 thr':>8s} {'peak 8':>8s}")
    for k, label in (("ember_python", "ember, Python (runtime only)"),
                     ("ember_python_copying_weights", "ember, Python, copying weights (old)"),
                     ("torch_eager", "PyTorch eager (torch+transformers)")):
        m = mem[k]
        print(f"{label:38s} {m['baseline_mib']:9.1f} {m['loaded_mib']:8.1f} {m['one_call_mib']:8.1f} "
              f"{m['peak_before_threads_mib']:8.1f} {m['eight_threads_mib']:8.1f} {m['peak_mib']:8.1f}")
    print(f"{'ember, C++ app':38s} {'':>9s} {'':>8s} {mem['cpp']['one_call_mib']:8.1f} "
          f"{mem['cpp']['peak_mib']:8.1f}")
    print("peak 1: highest RSS up to and including the first call; 8 thr / peak 8: after / highest while 8 threads "
          "called the model at once (5 calls each)")
    print(f"weights {weight_mib:.1f} MiB; loading added {checks['load_adds_mib']:.1f} MiB; 8 concurrent threads "
          f"added {checks['eight_threads_add_mib']:.1f} MiB")

    os.makedirs(a.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = os.path.join(a.out, f"embed_{date}.json")
    with open(path, "w") as f:
        json.dump({"date": date, "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                                             "platform": platform.platform()},
                   "loadavg_before": load_before, "loadavg_after": load_after,
                   "command": "python benchmarks/embed_bench.py " + " ".join(sys.argv[1:]),
                   "model": "all-MiniLM-L6-v2, batch 1, seq 128, fp32", "artifact_target": manifest["target"]["name"],
                   "latency_ms_median": med, "latency_ms_rounds": lat, "agreement": agreement,
                   "memory_mib": mem, "checks": checks}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
