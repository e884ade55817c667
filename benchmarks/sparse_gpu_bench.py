"""N:M sparse GEMV on one NVIDIA GPU: ember's packed sparse kernel vs torch dense fp16 (cuBLAS), in one run.

Step 1, on the build machine (no GPU needed; CUDA compiled ahead of time):
    python benchmarks/sparse_gpu_bench.py prepare --out gpu_artifacts/sparse [--target cuda-sm90]
compiles ember's sparse kernel (ember.passes.sparsity.gpu_kernel, fp16, batch symbolic) for every shape and N:M.

Step 2, on the GPU machine, with TVM's runtime only (shared/gpu/README.md):
    python benchmarks/sparse_gpu_bench.py run gpu_artifacts/sparse --out $OUT
makes the weights there (seeded numpy, fp16, N:M-pruned by magnitude, packed by ember.passes.sparsity.pack.pack_gpu
exactly as ember.compile does for a GPU target), checks ember's output against torch on the masked dense weight
(and an fp32 reference), and times, for ember sparse and torch dense fp16 alike:
  * ``events``: CUDA events around 200 back-to-back calls from Python (launch cost included when it is the
    bottleneck; how gpu_bench.py measured torch's 36.4 us);
  * ``graph``: 200 calls captured in one CUDA graph, replayed (the kernel's own time plus the graph's launch gap);
  * ``graph_cold``: the same, cycling through enough weight copies (> 2x the 50 MiB L2) that every call reads its
    weights from HBM — what a model with many layers sees. Hot numbers for a 7 MiB packed weight come from L2.
Writes sparse_gpu_bench.json under --out.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cuda_events_us, prepare_run_parser  # noqa: E402

# (out features N, in features K): y[1, N] = x[1, K] @ W[N, K].T — gpu_bench.py's names
SHAPES = {"4096x11008": (4096, 11008), "4096x4096": (4096, 4096)}
SCHEMES = [(1, 16), (1, 8), (2, 4)]
L2_BYTES = 50 * 2**20  # H100 SXM
# Besides ember's default kernel, variants with other lane counts (threads per row; 16 x lanes per block) for
# the 4096x11008 shape: which one streams HBM best is measured, not guessed.
LANE_VARIANTS = (8, 16, 32, 64)


def _name(shape, n, m, lanes=None):
    return f"sparse_{shape}_{n}_{m}" + (f"_L{lanes}" if lanes else "")


# ----------------------------------------------------------------------------------------------------------------
def prepare(a):
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.targets import resolve
    from ember.passes.sparsity.sparse_matmul import sparse_matmul_func

    os.makedirs(a.out, exist_ok=True)
    name, target = resolve(a.target)
    index = {"target": a.target, "kernels": {}}
    from ember.passes.sparsity.gpu_kernel import gpu_kernel

    for shape, (n_out, k) in SHAPES.items():
        for n, m in SCHEMES:
            for lanes in (None,) + (LANE_VARIANTS if shape == "4096x11008" and not a.no_variants else ()):
                t0 = time.perf_counter()
                if lanes is None:  # exactly what ember.compile uses for this target
                    func = sparse_matmul_func(tvm.tirx.Var("batch", "int64"), k, n_out, n, m, "float16", target)
                else:
                    func = gpu_kernel(k, n_out, n, m, "float16", lanes=lanes)
                with cuda_build_environment(target, name), target:
                    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
                key = _name(shape, n, m, lanes)
                lib.export_library(os.path.join(a.out, key + ".so"))
                index["kernels"][key] = {"shape": shape, "n_out": n_out, "k": k, "n": n, "m": m, "lib": key + ".so",
                                         "lanes": lanes or "default"}
                print(f"{key}.so: {time.perf_counter() - t0:.1f} s", flush=True)
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
_events_us = cuda_events_us  # min of 3 batches of 200 back-to-back calls


def _graph_us(calls, iters=200, use_tvm_stream=False):
    """Per-call us of ``iters`` calls (cycling through ``calls``) captured in one CUDA graph, best of 5 replays."""
    import torch

    for fn in calls:  # warm up outside the capture (module load, first launch)
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    ctx = torch.cuda.graph(g)
    if use_tvm_stream:  # TVM launches on the stream tvm-ffi is told about: torch's capture stream
        import tvm_ffi

        ctx = tvm_ffi.use_torch_stream(ctx)
    with ctx:
        for i in range(iters):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / iters)
    return best


def _weights(n_out, k, n, m, seed):
    """Seeded fp16 weight [N, K] pruned to n:m by magnitude, its GPU packing, and x — made alike anywhere."""
    from ember.passes.sparsity.pack import nm_mask, pack_gpu

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_out, k), dtype=np.float32) * 0.05).astype(np.float16)
    w = w * nm_mask(w, n, m)
    x = rng.standard_normal((4, k), dtype=np.float32).astype(np.float16)
    return w, pack_gpu(w, n, m), x


def run(a):
    import torch
    import tvm

    from ember.runtime.load import _load_device_runtime

    _load_device_runtime("cuda")
    index = json.load(open(os.path.join(a.dir, "index.json")))
    rows, dense_done, made = [], {}, {}
    for name, info in index["kernels"].items():
        n_out, k, n, m = info["n_out"], info["k"], info["n"], info["m"]
        t0 = time.perf_counter()
        if (n_out, k, n, m) not in made:
            made.clear()  # one weight in memory at a time
            made[n_out, k, n, m] = _weights(n_out, k, n, m, seed=n_out + k + 100 * m + n)
        w, p, x_np = made[n_out, k, n, m]
        row = {"kernel": name, "shape": info["shape"], "n_out": n_out, "k": k, "scheme": f"{n}:{m}",
               "lanes": info.get("lanes", "default"),
               "packed_bytes": p.nbytes, "dense_bytes": int(n_out * k * 2), "pack_s": round(time.perf_counter() - t0, 1)}
        try:
            lib = tvm.runtime.load_module(os.path.join(a.dir, info["lib"]))
            f = lib["main"]
            wt = torch.from_numpy(w).cuda()
            vals, idx = torch.from_numpy(p.values).cuda(), torch.from_numpy(p.indices).cuda()
            for batch in (1, 4):
                x = torch.from_numpy(x_np[:batch]).cuda()
                y = torch.full((batch, n_out), float("nan"), device="cuda", dtype=torch.float16)
                args = [tvm.runtime.from_dlpack(t) for t in (x, vals, idx, y)]
                f(*args)
                torch.cuda.synchronize()
                ref = x.float() @ wt.float().t()
                with torch.inference_mode():
                    t16 = (x @ wt.t()).float()
                scale = float(ref.abs().max())
                err, terr = float((y.float() - ref).abs().max()), float((t16 - ref).abs().max())
                b = f"b{batch}"
                row[f"{b}_scale"], row[f"{b}_ember_max_err"], row[f"{b}_torch_fp16_max_err"] = scale, err, terr
                row[f"{b}_ok"] = bool(err <= max(4 * terr, 1e-2 * scale))
                row[f"{b}_ember_events_us"] = _events_us(lambda: f(*args))
                try:
                    row[f"{b}_ember_graph_us"] = _graph_us([lambda: f(*args)], use_tvm_stream=True)
                except Exception as e:  # pylint: disable=broad-except
                    row[f"{b}_ember_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if batch == 1:
                    copies = max(1, min(64, -(-2 * L2_BYTES // p.nbytes)))
                    cold = []
                    for _ in range(copies):
                        cv, ci = vals.clone(), idx.clone()
                        yy = torch.empty_like(y)
                        cargs = [tvm.runtime.from_dlpack(t) for t in (x, cv, ci, yy)]
                        cold.append((lambda ca=cargs: f(*ca), (cv, ci, yy)))
                    row["cold_copies"] = copies
                    try:
                        row["b1_ember_graph_cold_us"] = _graph_us([c for c, _ in cold], use_tvm_stream=True)
                    except Exception as e:  # pylint: disable=broad-except
                        row["b1_ember_graph_cold_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    row["b1_ember_events_cold_us"] = _events_us(lambda it=iter(range(10**9)): cold[next(it) % copies][0]())
                    del cold
                # torch dense fp16 on the same shape (cuBLAS does not skip zeros: the masked weight costs the same)
                key = (n_out, k, batch)
                if key not in dense_done:
                    d = {}
                    with torch.inference_mode():
                        d["events_us"] = _events_us(lambda: torch.matmul(x, wt.t()))
                        d["graph_us"] = _graph_us([lambda: torch.matmul(x, wt.t())])
                        if batch == 1:
                            copies = max(1, -(-2 * L2_BYTES // (n_out * k * 2)))
                            ws = [wt.clone() for _ in range(copies)]
                            d["cold_copies"] = copies
                            d["graph_cold_us"] = _graph_us([lambda ww=ww: torch.matmul(x, ww.t()) for ww in ws])
                            d["events_cold_us"] = _events_us(
                                lambda it=iter(range(10**9)): torch.matmul(x, ws[next(it) % copies].t()))
                            del ws
                    dense_done[key] = d
                for kk, vv in dense_done[key].items():
                    row[f"{b}_torch_dense_{kk}"] = vv
                for mode in ("events", "graph", "graph_cold", "events_cold"):
                    e, t = row.get(f"{b}_ember_{mode}_us"), row.get(f"{b}_torch_dense_{mode}_us")
                    if e and t:
                        row[f"{b}_speedup_{mode}"] = t / e
                if row.get(f"{b}_ember_graph_cold_us"):
                    row[f"{b}_ember_cold_gbps"] = p.nbytes / row[f"{b}_ember_graph_cold_us"] / 1e3
                if row.get(f"{b}_torch_dense_graph_cold_us"):
                    row[f"{b}_torch_cold_gbps"] = n_out * k * 2 / row[f"{b}_torch_dense_graph_cold_us"] / 1e3
            del wt, vals, idx
            torch.cuda.empty_cache()
        except Exception as e:  # report every kernel, failures included
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "target": index["target"],
            "command": " ".join(sys.argv), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sparse_gpu_bench.json"), "w") as f:
        json.dump(info, f, indent=1)
    print_table(info)


def print_table(info):
    print(f"\n{info['gpu']}  torch {info['torch']}  (us per call, batch 1; speedup = torch dense / ember)")
    print(f"{'kernel':26s} {'MiB':>6s} {'ok':>3s} | {'events':>7s} {'torch':>7s} {'x':>5s} | {'graph':>6s} {'torch':>7s} "
          f"{'x':>5s} | {'cold':>6s} {'torch':>7s} {'x':>5s} {'GB/s':>5s}")

    def f(v, w=7, p=1):
        return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"

    for r in info["rows"]:
        print(f"{r['kernel']:26s} {r['packed_bytes'] / 2**20:6.2f} {'y' if r.get('b1_ok') else 'N':>3s} | "
              f"{f(r.get('b1_ember_events_us'))} {f(r.get('b1_torch_dense_events_us'))} {f(r.get('b1_speedup_events'), 5)} | "
              f"{f(r.get('b1_ember_graph_us'), 6)} {f(r.get('b1_torch_dense_graph_us'))} {f(r.get('b1_speedup_graph'), 5)} | "
              f"{f(r.get('b1_ember_graph_cold_us'), 6)} {f(r.get('b1_torch_dense_graph_cold_us'))} "
              f"{f(r.get('b1_speedup_graph_cold'), 5)} {f(r.get('b1_ember_cold_gbps'), 5, 0)}  {r.get('error', '')}")


def main():
    ap, _, p, r = prepare_run_parser(__doc__)
    p.add_argument("--no-variants", action="store_true", help="only the kernels ember.compile uses")
    a = ap.parse_args()
    prepare(a) if a.cmd == "prepare" else run(a)


if __name__ == "__main__":
    main()
