"""ember's Hopper wgmma GEMM (ember/schedules/gpu/hopper_gemm.py) against torch (cuBLAS) on one H100, per variant.

Step 1, on the build machine (no GPU needed):
    python benchmarks/hopper_gemm_bench.py prepare --out gpu_artifacts/hopper [--only NAME,...]
compiles every (problem, kernel config) pair for sm_90a: "auto" (the rule's own choice), "legacy" (its choice with
EMBER_HOPPER_LEGACY=1: the rule before the staged epilogue / vectorized erf / 64-row tiles), "direct" (its choice
with EMBER_HOPPER_STAGED=0) and the fixed configs of configs() (--configs picks some).
Step 2, on the GPU machine with TVM's runtime only (shared/gpu/README.md):
    python benchmarks/hopper_gemm_bench.py run gpu_artifacts/hopper --out $OUT
checks each kernel against torch on random fp16 inputs (fp32 reference) and times it with CUDA events (min of 3
batches of 200 back-to-back calls), torch in the same process. Writes hopper_gemm.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cuda_events_us, prepare_run_parser  # noqa: E402

# problem name -> (m, n, k, layout, epilogue): "none" (C = A W in fp16), "bias" (MiniLM's fp16 linear: fp32
# accumulation, cast, bias add), "gelu" (bias, then tanh-GELU in fp32) or "gelu_erf" (MiniLM's FFN-up exactly as
# FuseTIR hands it over: bias, reshape to [batch, seq, n], TVM's fp16 erf-GELU); odd sizes check the padded tiles
# (TMA zero fill, guarded stores).
PROBLEMS = {
    "gemm_256^3_nt": (256, 256, 256, "nt", "none"),  # small: quick to rerun under compute-sanitizer
    "gemm_256^3_nn": (256, 256, 256, "nn", "none"),
    "gemm_4096^3_nt": (4096, 4096, 4096, "nt", "none"),
    "gemm_4096^3_nn": (4096, 4096, 4096, "nn", "none"),
    "linear_qkvo_b32_4096x384x384": (4096, 384, 384, "nn", "bias"),
    "linear_ffn_up_b32_4096x1536x384": (4096, 1536, 384, "nn", "bias"),
    "linear_ffn_down_b32_4096x384x1536": (4096, 384, 1536, "nn", "bias"),
    "linear_gelu_4096x1536x384": (4096, 1536, 384, "nn", "gelu"),
    "ffn_up_erf_gelu_b32_4096x1536x384": (4096, 1536, 384, "nn", "gelu_erf"),  # the in-model kernel
    "odd_1000x200x136_nt": (1000, 200, 136, "nt", "bias"),
    "odd_1000x200x136_nn": (1000, 200, 136, "nn", "bias"),
}


def linear_func(m, n, k, layout, epilogue):
    """The kernel as ember's fused graph has it (see the module doc of PROBLEMS)."""
    import tvm
    from tvm import te

    x = te.placeholder((m, k), "float16", name="x")
    w = te.placeholder((k, n) if layout == "nn" else (n, k), "float16", name="w")
    b = te.placeholder((n,), "float16", name="b")
    r = te.reduce_axis((0, k), "k")
    wv = (lambda j: w[r, j]) if layout == "nn" else (lambda j: w[j, r])
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype("float32") * wv(j).astype("float32"), axis=r),
                   name="y")
    h = te.compute((m, n), lambda i, j: y[i, j].astype("float16"), name="cast")
    if epilogue == "none":
        return te.create_prim_func([x, w, h]).with_attr("global_symbol", "main")
    o = te.compute((m, n), lambda i, j: h[i, j] + b[j], name="bias")
    if epilogue == "gelu_erf":  # MiniLM's FFN-up exactly as FuseTIR hands it over: reshape, then the fp16 erf-GELU
        bt = m // 128 if m % 128 == 0 else 1
        r3 = te.compute((bt, m // bt, n), lambda a, s, j: o[a * (m // bt) + s, j], name="reshape")
        half = lambda v: tvm.tirx.const(v, "float16")  # noqa: E731

        def erf_gelu(a, s, j):
            v = r3[a, s, j]
            e = te.erf((v * half(0.70710678118654757)).astype("float32")).astype("float16")
            return v * (half(0.5) + e * half(0.5))

        o = te.compute((bt, m // bt, n), erf_gelu, name="gelu")
        return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")
    if epilogue == "gelu":
        def gelu(i, j):
            v = o[i, j].astype("float32")
            return (0.5 * v * (1 + te.tanh(0.7978845608 * (v + 0.044715 * v * v * v)))).astype("float16")

        o = te.compute((m, n), gelu, name="gelu")
    return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")


def configs():
    from ember.schedules.gpu.hopper_gemm import HopperConfig

    # run 2 (benchmarks/results/hopper_gemm_h100_2026-11-26_run2.json) also had c1n128s6, c1n256s4, c2n256s3 and
    # c2n256s4 without setmaxnreg: each slower than the best below on every problem.
    base = {"c2n256s4": HopperConfig(consumers=2, bn=256, stages=4),
            "c2n192s4": HopperConfig(consumers=2, bn=192, stages=4),
            "c2n128s6": HopperConfig(consumers=2, bn=128, stages=6),
            "c1n192s4": HopperConfig(consumers=1, bn=192, stages=4),  # 64-row tiles: 128 blocks at N = 384
            "c1n128s6": HopperConfig(consumers=1, bn=128, stages=6)}
    out = {**base, **{f"{k}p": dataclasses.replace(c, persistent=True) for k, c in base.items()}}
    # "s": the staged epilogue (the tile through shared memory, 16-byte row stores)
    out.update({f"{k}s": dataclasses.replace(c, staged=True) for k, c in out.items() if c.bn < 256})
    return out


def prepare(a):
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.targets import resolve
    _, target = resolve(a.target)
    os.makedirs(a.out, exist_ok=True)
    only = set(a.only.split(",")) if a.only else None
    wanted = set(a.configs.split(",")) if a.configs else None
    index = {"target": a.target, "problems": {}}
    for name, (m, n, k, layout, epilogue) in PROBLEMS.items():
        if only and name not in only:
            continue
        entry = index["problems"].setdefault(name, dict(m=m, n=n, k=k, layout=layout, epilogue=epilogue,
                                                        variants={}))
        # "legacy": the rule's own choice with EMBER_HOPPER_LEGACY=1 (before the vectorizable erf, the staged
        # epilogue and 64-row tiles); "direct": its choice with EMBER_HOPPER_STAGED=0 (stores from the fragment)
        for cname, cfg in [("auto", None), ("legacy", None), ("direct", None)] + list(configs().items()):
            if wanted and cname not in wanted:
                continue
            if cfg is not None and n % cfg.bn and cfg.bn == 256 and n < 1024:
                continue
            if m * n <= 256 * 256 and cname not in ("c2n256s4", "c2n128s6"):
                continue
            t0 = time.perf_counter()
            try:
                os.environ["EMBER_HOPPER_LEGACY"] = "1" if cname == "legacy" else ""
                os.environ["EMBER_HOPPER_STAGED"] = "0" if cname == "direct" else ""
                func = _scheduled(linear_func(m, n, k, layout, epilogue), cfg, target)
                with cuda_build_environment(target, str(target)), target:
                    lib = tvm.compile(tvm.IRModule({"main": func}), target)
            except Exception as e:  # pylint: disable=broad-except
                print(f"{name} [{cname}]: not built ({type(e).__name__}: {str(e).strip()[-300:]})")
                continue
            path = f"{name}.{cname}.so"
            lib.export_library(os.path.join(a.out, path))
            entry["variants"][cname] = path
            print(f"{name} [{cname}]: {time.perf_counter() - t0:.1f} s", flush=True)
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _scheduled(func, cfg, target):
    """``func`` scheduled by HopperGemm (``cfg`` None: the rule's own tile choice); raises where it declines."""
    import tvm
    from tvm.s_tir import dlight as dl

    from ember.schedules.gpu.hopper_gemm import HopperGemm

    mod = tvm.IRModule({"main": func})
    with target:
        mod = dl.ApplyDefaultSchedule(HopperGemm(cfg))(mod)
    func = mod["main"]
    if not (func.attrs and "tirx.is_scheduled" in func.attrs):
        raise RuntimeError("HopperGemm declined the kernel")
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
        m, n, k, layout, epilogue = p["m"], p["n"], p["k"], p["layout"], p["epilogue"]
        linear = epilogue != "none"
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        w = torch.randn(*((n, k) if layout == "nt" else (k, n)), device="cuda", dtype=torch.float16, generator=g)
        bias = torch.randn(n, device="cuda", dtype=torch.float16, generator=g)
        wt = w.t() if layout == "nt" else w
        if epilogue == "gelu":
            tfn = lambda: torch.nn.functional.gelu(torch.addmm(bias, x, wt), approximate="tanh")  # noqa: E731
        elif epilogue == "gelu_erf":
            tfn = lambda: torch.nn.functional.gelu(torch.addmm(bias, x, wt))  # noqa: E731
        elif linear:
            tfn = lambda: torch.addmm(bias, x, wt)  # noqa: E731
        else:
            tfn = lambda: torch.matmul(x, wt)  # noqa: E731
        ref = x.float() @ wt.float()
        if linear:
            ref = ref + bias.float()
        if epilogue == "gelu":
            ref = torch.nn.functional.gelu(ref, approximate="tanh")
        elif epilogue == "gelu_erf":
            ref = torch.nn.functional.gelu(ref)
        row = {"problem": name, "m": m, "n": n, "k": k, "layout": layout, "epilogue": epilogue}
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
                if epilogue == "gelu_erf":  # the kernel writes [batch, seq, n] (the reshape inside it)
                    y = y.view(m // 128 if m % 128 == 0 else 1, -1, n)
                args = [tvm.runtime.from_dlpack(t) for t in ((x, w, bias, y) if linear else (x, w, y))]
                f(*args)
                torch.cuda.synchronize()
                err = float((y.reshape(m, n).float() - ref).abs().nan_to_num(float("inf")).max())
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
    ap, _, p, r = prepare_run_parser(__doc__)
    p.add_argument("--only", default="")
    p.add_argument("--configs", default="")
    r.add_argument("--time-wrong", action="store_true", help="also time kernels whose result is wrong")
    r.add_argument("--only", default="")
    r.add_argument("--configs", default="")
    r.add_argument("--hang-s", type=float, default=30, help="end the process when one variant takes longer")
    a = ap.parse_args()
    prepare(a) if a.cmd == "prepare" else run(a)


if __name__ == "__main__":
    main()
