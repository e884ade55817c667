"""ember's Hopper wgmma GEMM (ember/schedules/gpu/hopper_gemm.py) against torch (cuBLAS) on one H100, per variant.

Step 1, on the build machine (no GPU needed):
    python benchmarks/hopper_gemm_bench.py prepare --out gpu_artifacts/hopper [--only NAME,...]
compiles every (problem, kernel config) pair of VARIANTS for sm_90a.
Step 2, on the GPU machine with TVM's runtime only (shared/gpu/README.md):
    python benchmarks/hopper_gemm_bench.py run gpu_artifacts/hopper --out $OUT
checks each kernel against torch on random fp16 inputs (fp32 reference) and times it with CUDA events (min of 3
batches of 200 back-to-back calls), torch in the same process. Writes hopper_gemm.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cuda_events_us  # noqa: E402

# problem name -> (m, n, k, layout, linear): linear = MiniLM's fp16 linear (fp32 accumulation, cast, bias add)
PROBLEMS = {
    "gemm_256^3_nt": (256, 256, 256, "nt", False),  # small: quick to rerun under compute-sanitizer
    "gemm_256^3_nn": (256, 256, 256, "nn", False),
    "gemm_4096^3_nt": (4096, 4096, 4096, "nt", False),
    "gemm_4096^3_nn": (4096, 4096, 4096, "nn", False),
    "linear_qkvo_b32_4096x384x384": (4096, 384, 384, "nn", True),
    "linear_ffn_up_b32_4096x1536x384": (4096, 1536, 384, "nn", True),
    "linear_ffn_down_b32_4096x384x1536": (4096, 384, 1536, "nn", True),
}


def configs():
    from ember.schedules.gpu.hopper_gemm import HopperConfig

    return {
        "c2n256s4": HopperConfig(consumers=2, bn=256, stages=4),
        "c2n128s6": HopperConfig(consumers=2, bn=128, stages=6),
        "c2n256s4_noreg": HopperConfig(consumers=2, bn=256, stages=4, raise_regs=False),
        "c1n128s6": HopperConfig(consumers=1, bn=128, stages=6),
        "c2n192s4": HopperConfig(consumers=2, bn=192, stages=4),
        "c2n256s3": HopperConfig(consumers=2, bn=256, stages=3),
        "c1n256s4": HopperConfig(consumers=1, bn=256, stages=4),
    }


def prepare(a):
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.targets import resolve
    from ember.schedules.gpu.hopper_gemm import wgmma_gemm

    _, target = resolve(a.target)
    os.makedirs(a.out, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    wanted = set(a.configs.split(",")) if a.configs else None
    index = {"target": a.target, "problems": {}}
    for name, (m, n, k, layout, linear) in PROBLEMS.items():
        if only and name not in only:
            continue
        entry = index["problems"].setdefault(name, dict(m=m, n=n, k=k, layout=layout, linear=linear, variants={}))
        for cname, cfg in configs().items():
            if wanted and cname not in wanted:
                continue
            if n % cfg.bn and cfg.bn == 256 and n < 1024:
                continue
            if m * n <= 256 * 256 and cname not in ("c2n256s4", "c2n128s6"):
                continue
            t0 = time.perf_counter()
            try:
                if linear:
                    func = _linear_kernel(m, n, k, cfg, target)
                else:
                    func = wgmma_gemm(m, n, k, layout, "float16", cfg)
                with cuda_build_environment(target, str(target)), target:
                    lib = tvm.compile(tvm.IRModule({"main": func}), target)
            except Exception as e:  # pylint: disable=broad-except
                print(f"{name} [{cname}]: does not compile ({type(e).__name__}: {str(e).strip()[-300:]})")
                continue
            path = f"{name}.{cname}.so"
            lib.export_library(os.path.join(a.out, path))
            entry["variants"][cname] = path
            print(f"{name} [{cname}]: {time.perf_counter() - t0:.1f} s", flush=True)
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _linear_kernel(m, n, k, cfg, target):
    """MiniLM's linear as ember compiles it (gpu_bench.matmul_func(linear=True)), scheduled by HopperGemm."""
    import tvm
    from tvm.s_tir import dlight as dl

    from gpu_bench import matmul_func  # noqa: E402  pylint: disable=import-outside-toplevel
    from ember.schedules.gpu.hopper_gemm import HopperGemm

    mod = tvm.IRModule({"main": matmul_func(m, n, k, "nn", linear=True)})
    with target:
        mod = dl.ApplyDefaultSchedule(HopperGemm(cfg))(mod)
    func = mod["main"]
    if not (func.attrs and "tirx.is_scheduled" in func.attrs):
        raise RuntimeError("HopperGemm declined the linear kernel")
    return func


def run(a):
    import torch
    import tvm

    from ember.runtime.load import _load_device_runtime

    _load_device_runtime("cuda")
    index = json.load(open(os.path.join(a.dir, "index.json")))
    rows = []
    # A kernel that deadlocks (a wrong barrier phase) would hang the whole call: every variant is logged before
    # it starts, a watchdog ends the process after --hang-s, and a rerun (same --out) skips what was started.
    os.makedirs(a.out, exist_ok=True)
    log_path = os.path.join(a.out, "progress.jsonl")
    started = set()
    if os.path.exists(log_path):
        for line in open(log_path):
            started.add(tuple(json.loads(line)["start"]))
    log = open(log_path, "a")
    res = open(os.path.join(a.out, "results.jsonl"), "a")
    only = set(a.only.split(",")) if a.only else None
    wanted = set(a.configs.split(",")) if a.configs else None
    for name, p in index["problems"].items():
        if only and name not in only:
            continue
        m, n, k, layout, linear = p["m"], p["n"], p["k"], p["layout"], p["linear"]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        w = torch.randn(*((n, k) if layout == "nt" else (k, n)), device="cuda", dtype=torch.float16, generator=g)
        bias = torch.randn(n, device="cuda", dtype=torch.float16, generator=g)
        wt = w.t() if layout == "nt" else w
        if linear:
            tfn = lambda: torch.addmm(bias, x, wt)  # noqa: E731
        else:
            tfn = lambda: torch.matmul(x, wt)  # noqa: E731
        ref = x.float() @ wt.float()
        if linear:
            ref = ref + bias.float()
        row = {"problem": name, "m": m, "n": n, "k": k, "layout": layout, "linear": linear}
        row["torch_us"] = cuda_events_us(tfn)
        row["torch_max_err"] = float((tfn().float() - ref).abs().max())
        row["scale"] = float(ref.abs().max())
        flops = 2 * m * n * k
        row["torch_tflops"] = flops / row["torch_us"] / 1e6
        res.write(json.dumps({"problem": name, "variant": "torch", **row}) + "\n")
        for cname, path in p["variants"].items():
            if wanted and cname not in wanted:
                continue
            if (name, cname) in started:
                row[f"{cname}_error"] = "hung or crashed in an earlier attempt"
                continue
            log.write(json.dumps({"start": [name, cname]}) + "\n")
            log.flush()
            import threading

            dog = threading.Timer(a.hang_s, lambda: (print(f"HANG {name} {cname}", flush=True), os._exit(3)))
            dog.start()
            try:
                f = tvm.runtime.load_module(os.path.join(a.dir, path))["main"]
                y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
                args = [tvm.runtime.from_dlpack(t) for t in ((x, w, bias, y) if linear else (x, w, y))]
                f(*args)
                torch.cuda.synchronize()
                err = float((y.float() - ref).abs().nan_to_num(float("inf")).max())
                row[f"{cname}_max_err"] = err
                row[f"{cname}_ok"] = bool(err <= max(4 * row["torch_max_err"], 1e-2 * row["scale"]))
                if row[f"{cname}_ok"] or a.time_wrong:
                    us = cuda_events_us(lambda: f(*args))
                    row[f"{cname}_us"] = us
                    row[f"{cname}_tflops"] = flops / us / 1e6
                    row[f"{cname}_pct_torch"] = 100 * row["torch_us"] / us
            except Exception as e:  # pylint: disable=broad-except
                row[f"{cname}_error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
            dog.cancel()
            res.write(json.dumps({"problem": name, "variant": cname,
                                  **{k_: v for k_, v in row.items() if k_.startswith(cname + "_")}}) + "\n")
            res.flush()
            try:
                torch.cuda.synchronize()
            except Exception:  # pylint: disable=broad-except
                print(f"CONTEXT LOST after {name} {cname}", flush=True)
                os._exit(4)  # a fault poisons the CUDA context: the rerun goes on with the next variant
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv),
            "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    suffix = f"_{len(started)}" if started else ""
    with open(os.path.join(a.out, f"hopper_gemm{suffix}.json"), "w") as f:
        json.dump(info, f, indent=2)
    for r in rows:
        best = max((k_[:-7] for k_ in r if k_.endswith("_tflops") and not k_.startswith("torch")),
                   key=lambda c: r[f"{c}_tflops"], default=None)
        print(f"{r['problem']:36s} torch {r['torch_tflops']:6.0f} TFLOP/s; best {best}: "
              f"{r.get(f'{best}_tflops', 0):6.0f} TFLOP/s ({r.get(f'{best}_pct_torch', 0):.0f}% of torch)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="cuda-sm90")
    p.add_argument("--only", default="")
    p.add_argument("--configs", default="")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--out", default=".")
    r.add_argument("--time-wrong", action="store_true", help="also time kernels whose result is wrong")
    r.add_argument("--only", default="")
    r.add_argument("--configs", default="")
    r.add_argument("--hang-s", type=float, default=30, help="end the process when one variant takes longer")
    a = ap.parse_args()
    prepare(a) if a.cmd == "prepare" else run(a)


if __name__ == "__main__":
    main()
