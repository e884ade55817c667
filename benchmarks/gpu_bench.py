"""ember vs PyTorch on one NVIDIA GPU: fp16 GEMM, decode GEMVs and the MiniLM architecture, in one run.

Step 1, on the build machine (no GPU needed; CUDA compiled ahead of time, see ember/compiler/cuda_aot.py):
    python benchmarks/gpu_bench.py prepare --out gpu_artifacts [--target cuda-sm90]
compiles each kernel twice (ember's GPU rules, and dlight's defaults as the baseline ember had before) and the
MiniLM-architecture encoder in fp16 (random weights, vocabulary cut to 1024: the weights then fit one device-tool
call; the architecture, hence the kernels and their cost, is the real one) for batch 1 and 32, seq 128.

Step 2, on the GPU machine, with TVM's runtime only (shared/gpu/README.md):
    python benchmarks/gpu_bench.py run gpu_artifacts --out $OUT [--no-compile-torch]
checks every kernel and model against PyTorch on the same GPU and times:
  kernels: ember, dlight, torch (cuBLAS), each with CUDA events around 200 back-to-back calls;
  models:  ember (fp16, CUDA graph), ember without CUDA graph (batch 1), torch eager fp16, torch.compile
           max-autotune-no-cudagraphs and reduce-overhead (CUDA graphs); median wall time of one call + sync.
Writes gpu_bench.json and gpu_bench.png (when matplotlib is there; else `python benchmarks/gpu_bench.py plot
gpu_bench.json` makes it anywhere).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import MINILM_CONFIG, cuda_events_us, cuda_kernel_times, cuda_median_ms, minilm_arch, prepare_run_parser  # noqa: E402

SEQ = 128
SHARED_PARAMS = "minilm_fp16.params.bin"  # older indexes: one params file for every MiniLM artifact

# name -> (kind, dict): y[b, n] = sum_k x[b, k] * w[n, k] ("nt", nn.Linear's layout) or w[k, n] ("nn").
KERNELS = {
    "gemm_4096^3_nt": ("gemm", dict(m=4096, n=4096, k=4096, layout="nt")),
    "gemm_4096^3_nn": ("gemm", dict(m=4096, n=4096, k=4096, layout="nn")),
    "gemv_4096x4096_b1": ("gemv", dict(m=1, n=4096, k=4096, layout="nt")),
    "gemv_4096x11008_b1": ("gemv", dict(m=1, n=4096, k=11008, layout="nt")),
    "gemv_11008x4096_b1": ("gemv", dict(m=1, n=11008, k=4096, layout="nt")),
    "gemv_4096x4096_b4": ("gemv", dict(m=4, n=4096, k=4096, layout="nt")),
    "gemv_4096x4096_b1_nn": ("gemv", dict(m=1, n=4096, k=4096, layout="nn")),
}
# The MiniLM layers' GEMMs as ember compiles them under precision="fp16" (weights stored [K, N], fp32
# accumulation, cast, bias): b1 = 128 tokens, b32 = 4096. name -> (kind, dict, tile variants besides "ember").
LINEARS = {
    "linear_qkvo_b1_128x384x384": (dict(m=128, n=384, k=384), ("micro", "tiny_s2")),
    "linear_ffn_up_b1_128x1536x384": (dict(m=128, n=1536, k=384), ("micro",)),
    "linear_ffn_down_b1_128x384x1536": (dict(m=128, n=384, k=1536), ("tiny", "tiny_s2", "micro_s2")),
    "linear_qkvo_b32_4096x384x384": (dict(m=4096, n=384, k=384), ("medium", "wide", "tiny")),
    "linear_ffn_up_b32_4096x1536x384": (dict(m=4096, n=1536, k=384), ("large", "small", "wide")),
    "linear_ffn_down_b32_4096x384x1536": (dict(m=4096, n=384, k=1536), ("medium", "medium_s2", "wide",
                                                                         "wide_s2")),
}
for _name, (_cfg, _variants) in LINEARS.items():
    KERNELS[_name] = ("linear", dict(**_cfg, layout="nn", variants=list(_variants)))


# Tile policies tried on whole models (prepare --policies): (m, n, k) -> tile spec such as "wide_s2", or None
# for the rule's own choice. Compiled as extra artifacts sharing the weights of the default one.
POLICIES = {
    "wide": lambda m, n, k: "wide" if m is not None and m >= 1024 and n <= 512 else None,
    "medium": lambda m, n, k: ("medium_s2" if k >= 1024 else "medium") if m is not None and m >= 1024 and n <= 512
    else None,
    "nosplit": lambda m, n, k: "tiny" if m is not None and m < 1024 and k >= 1024 else None,  # split-K off
}


def policy_tensor_core(policy):
    """Context: ember's tensor-core rule with the tile choice of POLICIES[policy] where it names one."""
    import contextlib

    from ember.schedules.gpu import tensor_core

    choose = POLICIES[policy]

    @contextlib.contextmanager
    def swapped():
        saved = tensor_core.choose_config

        def chosen(m, n, k):
            spec = choose(m, n, k)
            if spec is None:
                return saved(m, n, k)
            name, _, split = spec.partition("_s")
            return tensor_core.CONFIGS[name].with_split(int(split or 1))

        tensor_core.choose_config = chosen
        try:
            yield
        finally:
            tensor_core.choose_config = saved

    return swapped()


# Model variants with one of ember's GPU fusions turned off (prepare --variants), for before/after runs in the same
# call: "castfusion_off" = no fp16 layer norm outputs (ember.passes.half_norm), no fusion through casts, no RowNorm
# rule (ember as before issue 7's elementwise work); "rownorm_off" = the fusions on, layer norms on dlight's rule;
# "wgmma_off" = GEMMs on the WMMA rule instead of the Hopper wgmma one (ember.schedules.gpu.hopper_gemm);
# "fp16_residual" = the residual stream stored in fp16 only (ember.passes.fusion.EXACT_RESIDUAL = False).
# "attn_stream" = the streaming tensor-core attention kernel and the full [B, 1, S, S] mask (before issue 7's
# resident kernel: ember.passes.attention_kernels.RESIDENT, ember.passes.fusion.NARROW_MASKS off).
# "tuned" = the default build with the shipped CUDA tuning records applied (tuning/cuda-sm_90a-*, ember.schedules.tune).
VARIANTS = ("castfusion_off", "rownorm_off", "wgmma_off", "fp16_residual", "attn_stream", "tuned")


TUNING_DB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tuning")


def variant_context(variant):
    import contextlib

    import ember.schedules as schedules
    from ember.passes import fusion

    @contextlib.contextmanager
    def swapped():
        saved_passes, saved_rules, saved_exact = fusion.fusion_passes, schedules.gpu_rules, fusion.EXACT_RESIDUAL
        from ember.passes import attention_kernels
        saved_attn = attention_kernels.RESIDENT, fusion.NARROW_MASKS
        if variant == "attn_stream":
            attention_kernels.RESIDENT, fusion.NARROW_MASKS = False, frozenset()
        if variant == "castfusion_off":
            fusion.fusion_passes = lambda t: [fusion.FuseAttention(t), fusion.FuseEpilogues()]
        if variant == "fp16_residual":
            fusion.EXACT_RESIDUAL = False
        dropped = {"wgmma_off": "HopperGemm", "fp16_residual": None, "attn_stream": None, "tuned": None}.get(variant,
                                                                                                   "RowNorm")
        schedules.gpu_rules = lambda: [r for r in saved_rules() if type(r).__name__ != dropped]
        try:
            yield
        finally:
            fusion.fusion_passes, schedules.gpu_rules, fusion.EXACT_RESIDUAL = saved_passes, saved_rules, saved_exact
            attention_kernels.RESIDENT, fusion.NARROW_MASKS = saved_attn

    return swapped()


def tile_rule(spec):
    """"tiny_s2" -> TensorCoreMatmul(tiny tiles, split-K 2)."""
    from ember.schedules.gpu.tensor_core import CONFIGS, TensorCoreMatmul

    name, _, split = spec.partition("_s")
    return TensorCoreMatmul(CONFIGS[name].with_split(int(split or 1)))


def baseline_tensor_core(rev):
    """Context: ember's tensor-core rule schedules as at git revision ``rev`` (for a before/after model)."""
    import contextlib

    from ember.schedules.gpu import tensor_core

    base = _baseline_module(rev)

    @contextlib.contextmanager
    def swapped():
        saved = tensor_core._schedule, tensor_core.choose_config
        tensor_core._schedule, tensor_core.choose_config = base._schedule, base.choose_config
        try:
            yield
        finally:
            tensor_core._schedule, tensor_core.choose_config = saved

    return swapped()


def baseline_rules(rev):
    """ember's GPU rules with the tensor-core rule as it was at git revision ``rev`` (before/after kernels)."""
    from ember.schedules import gpu_rules
    from ember.schedules.gpu.tensor_core import TensorCoreMatmul

    mod = _baseline_module(rev)
    return [mod.TensorCoreMatmul() if isinstance(r, TensorCoreMatmul) else r for r in gpu_rules()]


def _baseline_module(rev):
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:ember/schedules/gpu/tensor_core.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .common import", "from ember.schedules.gpu.common import")
    path = os.path.join(tempfile.mkdtemp(), "tensor_core_base.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location("tensor_core_base", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------------------
# Build machine
# ----------------------------------------------------------------------------------------------------------------
def matmul_func(m, n, k, layout, dtype="float16", linear=False):
    """``linear``: the kernel as ember's MiniLM has it under precision="fp16": fp32 accumulation of fp16
    operands, cast to fp16, bias add (an extra input b[n])."""
    from tvm import te

    x = te.placeholder((m, k), dtype, name="x")
    if layout == "nt":
        w = te.placeholder((n, k), dtype, name="w")
    else:
        w = te.placeholder((k, n), dtype, name="w")
    r = te.reduce_axis((0, k), "k")
    acc = "float32" if linear else dtype

    def wv(i, j):
        return w[j, r] if layout == "nt" else w[r, j]

    y = te.compute((m, n), lambda i, j: te.sum(x[i, r].astype(acc) * wv(i, j).astype(acc), axis=r), name="y")
    if not linear:
        return te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")
    b = te.placeholder((n,), dtype, name="b")
    h = te.compute((m, n), lambda i, j: y[i, j].astype(dtype), name="cast")
    o = te.compute((m, n), lambda i, j: h[i, j] + b[j], name="bias")
    return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")


def compile_kernel(func, target, rules):
    import tvm
    from tvm.s_tir import dlight as dl

    from ember.compiler.cuda_aot import cuda_build_environment

    mod = tvm.IRModule({"main": func})
    with target:
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
    with cuda_build_environment(target, str(target)), target:
        return tvm.compile(mod, target)


def dlight_rules():
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def minilm(batch, attn_implementation=None):
    """The MiniLM-L6 architecture (random weights, seeded: the same on both machines) and its inputs.

    ember compiles the module with transformers' "eager" attention (matmul, softmax, matmul: what
    ember.models.minilm loads and what ember's FuseAttention matches; the default "sdpa" export holds
    scaled_dot_product_attention, which it does not); the torch peers run transformers' default (SDPA), their
    fastest. Both have the same weights (minilm_arch seeds them)."""
    import torch

    encoder = minilm_arch(attn_implementation)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, MINILM_CONFIG["vocab_size"], (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.int64)
    mask[:, SEQ - 16:] = 0 if batch > 1 else 1  # some padding at batch 32: the mask is really used
    return encoder, (ids, mask)


MODELS = {  # name -> (batch, cuda_graph)
    "minilm_fp16_b1": (1, True),
    "minilm_fp16_b1_nograph": (1, False),
    "minilm_fp16_b32": (32, True),
}


def prepare(a):
    import tvm

    from ember.compiler.targets import resolve
    from ember.schedules import gpu_rules

    os.makedirs(a.out, exist_ok=True)
    _, target = resolve(a.target)
    only = set(a.only.split(",")) if a.only else None
    index = {"target": a.target, "kernels": {}, "models": {}}
    for name, (kind, cfg) in KERNELS.items():
        if only and name not in only:
            continue
        cfg = dict(cfg)
        tiles = cfg.pop("variants", [])
        if kind == "linear":  # ember now, ember at --baseline-rev, forced tile configs
            variants = [("ember", gpu_rules())]
            if a.baseline_rev:
                variants.append((f"ember_{a.baseline_rev[:7]}", baseline_rules(a.baseline_rev)))
            variants += [(f"tc_{t}", [tile_rule(t)]) for t in tiles]
        else:
            variants = [("ember", gpu_rules()), ("dlight", dlight_rules())]
        if kind in ("gemm", "linear"):  # ember without the Hopper wgmma rule: its WMMA kernels, same run
            variants.append(("wmma", [r for r in gpu_rules() if type(r).__name__ != "HopperGemm"]))
        if kind == "gemm":  # which tile config is best is measured, not guessed: every config, plus dlight's
            from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization

            from ember.schedules.gpu.tensor_core import CONFIGS, TensorCoreMatmul

            variants += [(f"tc_{c}", [TensorCoreMatmul(cfg)]) for c, cfg in CONFIGS.items()]
            variants += [("dlight_tensorcore", [MatmulTensorization()])]
        for variant, rules in variants:
            t0 = time.perf_counter()
            try:
                lib = compile_kernel(matmul_func(**cfg, linear=kind == "linear"), target, rules)
            except Exception as e:  # pylint: disable=broad-except
                print(f"{name} [{variant}]: does not compile ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})", flush=True)
                continue
            path = f"{name}.{variant}.so"
            lib.export_library(os.path.join(a.out, path))
            print(f"{name} [{variant}]: {time.perf_counter() - t0:.1f} s", flush=True)
            index["kernels"].setdefault(name, {"kind": kind, **cfg})[variant] = path
    save_index(a.out, index, only)
    if not a.skip_models:
        import ember

        for name, (batch, graph) in MODELS.items():
            if only and name not in only:
                continue
            model, args = minilm(batch, "eager")
            t0 = time.perf_counter()
            cm = ember.compile(model, args, target=a.target, precision="fp16", cuda_graph=graph)
            art = os.path.join(a.out, name)
            cm.export(art, overwrite=True)
            if a.baseline_rev and graph:  # the same model with the tensor-core rule of --baseline-rev
                with baseline_tensor_core(a.baseline_rev):
                    base = ember.compile(model, args, target=a.target, precision="fp16", cuda_graph=graph)
                base_name = f"{name}_{a.baseline_rev[:7]}"
                base.export(os.path.join(a.out, base_name), overwrite=True)
                os.remove(os.path.join(a.out, base_name, "params.bin"))  # the same weights as `name`'s
                index["models"][base_name] = {"batch": batch, "seq": SEQ, "cuda_graph": graph, "dir": base_name,
                                              "params": None, "baseline": a.baseline_rev}
            for variant in (a.variants.split(",") if a.variants and graph else []):
                tuned = {"tuning": ember.Tuning(database=TUNING_DB, apply_only=True)} if variant == "tuned" else {}
                with variant_context(variant):
                    var = ember.compile(model, args, target=a.target, precision="fp16", cuda_graph=graph, **tuned)
                var_name = f"{name}_{variant}"
                var.export(os.path.join(a.out, var_name), overwrite=True)
                os.remove(os.path.join(a.out, var_name, "params.bin"))
                index["models"][var_name] = {"batch": batch, "seq": SEQ, "cuda_graph": graph, "dir": var_name,
                                             "params": None, "baseline": variant,
                                             "launches": var.manifest["kernels"]["ember"]["launches"]}
            for policy in (a.policies.split(",") if a.policies and graph else []):
                with policy_tensor_core(policy):
                    var = ember.compile(model, args, target=a.target, precision="fp16", cuda_graph=graph)
                var_name = f"{name}_tiles_{policy}"
                var.export(os.path.join(a.out, var_name), overwrite=True)
                os.remove(os.path.join(a.out, var_name, "params.bin"))
                index["models"][var_name] = {"batch": batch, "seq": SEQ, "cuda_graph": graph, "dir": var_name,
                                             "params": None, "baseline": f"tiles_{policy}"}
            # Artifacts with identical weights (same batch, graph on/off) share one params file, named by its
            # hash, outside the artifact: a device-tool call carries 64 MiB. The run puts it back.
            digest = hashlib.sha256(open(os.path.join(art, "params.bin"), "rb").read()).hexdigest()[:16]
            shared = f"params-{digest}.bin"
            if a.gzip_params:  # fp16 weights shrink ~10-30%: b1 and b32 then fit one call beside the runtime
                import gzip

                with open(os.path.join(art, "params.bin"), "rb") as src, \
                        gzip.open(os.path.join(a.out, shared + ".gz"), "wb", compresslevel=1) as dst:
                    shutil.copyfileobj(src, dst)
                os.remove(os.path.join(art, "params.bin"))
            else:
                shutil.move(os.path.join(art, "params.bin"), os.path.join(a.out, shared))
            np.savez(os.path.join(a.out, name + ".inputs.npz"), *[t.numpy() for t in args])
            index["models"][name] = {"batch": batch, "seq": SEQ, "cuda_graph": graph, "dir": name,
                                     "params": shared, "launches": cm.manifest["kernels"]["ember"]["launches"]}
            for other in index["models"].values():
                if other["params"] is None and other["dir"].startswith(name + "_"):
                    other["params"] = shared
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            save_index(a.out, index, only)


def save_index(out, index, only):
    path = os.path.join(out, "index.json")
    if os.path.exists(path) and only:  # --only: update the entries built now, keep the others
        prev = json.load(open(path))
        for key in ("kernels", "models"):
            prev[key].update(index[key])
        index = prev
    with open(path, "w") as f:
        json.dump(index, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# GPU machine
# ----------------------------------------------------------------------------------------------------------------
_events_us = cuda_events_us  # min of 3 batches of 200 back-to-back calls


def _wall_ms(fn, repeat=200, warmup=20):
    return cuda_median_ms(fn, repeat, warmup)


def run_kernels(d, index, results):
    import torch
    import tvm

    from ember.runtime.load import _load_device_runtime

    _load_device_runtime("cuda")
    dev = tvm.cuda(0)
    for name, info in index["kernels"].items():
        m, n, k, layout = info["m"], info["n"], info["k"], info["layout"]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        w = torch.randn(*((n, k) if layout == "nt" else (k, n)), device="cuda", dtype=torch.float16, generator=g)
        x = x * 0.1
        linear = info["kind"] == "linear"
        bias = torch.randn(n, device="cuda", dtype=torch.float16, generator=g) if linear else None
        if linear:  # torch's fp16 nn.Linear on the same [K, N] weight (cuBLAS GEMM + bias epilogue)
            tfn = lambda: torch.addmm(bias, x, w)  # noqa: E731
        elif layout == "nt":
            tfn = lambda: torch.matmul(x, w.t())  # noqa: E731 - nn.Linear's call
        else:
            tfn = lambda: torch.matmul(x, w)  # noqa: E731
        ref = (x.float() @ (w.float().t() if layout == "nt" else w.float()))
        if linear:
            ref = ref + bias.float()
        row = {"kernel": name, **{key: info[key] for key in ("kind", "m", "n", "k", "layout")}}
        row["torch_us"] = _events_us(tfn)
        with torch.inference_mode():
            row["torch_max_err"] = float((tfn().float() - ref).abs().max())
        row["scale"] = float(ref.abs().max())
        for variant in [v for v in info if v.endswith(".so") is False and isinstance(info[v], str)
                        and info[v].endswith(".so")]:
            try:
                lib = tvm.runtime.load_module(os.path.join(d, info[variant]))
                f = lib["main"]
                y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                args = [tvm.runtime.from_dlpack(t) for t in ((x, w, bias, y) if linear else (x, w, y))]
                f(*args)
                torch.cuda.synchronize()
                err = float((y.float() - ref).abs().max())
                row[f"{variant}_max_err"] = err
                row[f"{variant}_ok"] = bool(err <= max(4 * row["torch_max_err"], 2e-2 * row["scale"]))
                row[f"{variant}_us"] = _events_us(lambda: f(*args))
                te = lib.time_evaluator("main", dev, number=50, repeat=5)
                row[f"{variant}_us_time_evaluator"] = float(np.median(te(*args).results) * 1e6)
            except Exception as e:  # report every kernel, failures included
                row[f"{variant}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        flops, byts = 2 * m * n * k, 2 * (m * k + n * k + m * n)
        for key in [k_[:-3] for k_ in list(row) if k_.endswith("_us")]:
            if f"{key}_us" in row:
                row[f"{key}_tflops"] = flops / row[f"{key}_us"] / 1e6
                row[f"{key}_gbps"] = byts / row[f"{key}_us"] / 1e3
        if "ember_us" in row:
            row["ember_vs_torch"] = row["torch_us"] / row["ember_us"]  # > 1: ember faster
        results.append(row)
        print(json.dumps(row), flush=True)


def _kernel_profile(fn, calls=20):
    """GPU time per call of each kernel name (us), largest first (benchtools.cuda_kernel_times)."""
    rows = cuda_kernel_times(fn, calls=calls, warmup=1)
    return {"total_us": round(sum(r[2] for r in rows), 1),
            "kernels": [{"name": k, "launches": round(n, 1), "us": round(t, 1)} for k, n, t in rows[:30]]}


def run_models(d, index, results, compile_torch, deadline, modes=("max-autotune-no-cudagraphs", "reduce-overhead"),
               only=None, profile=False, peer_attn=()):
    import torch

    import ember

    for name, info in index["models"].items():
        if only and name not in only:
            continue
        art = os.path.join(d, info["dir"])
        shared = os.path.join(d, info.get("params", SHARED_PARAMS))
        if os.path.exists(shared) and not os.path.exists(os.path.join(art, "params.bin")):
            shutil.copy(shared, os.path.join(art, "params.bin"))
        elif os.path.exists(shared + ".gz") and not os.path.exists(os.path.join(art, "params.bin")):
            import gzip

            with gzip.open(shared + ".gz", "rb") as src, open(os.path.join(art, "params.bin"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        model, args = minilm(info["batch"])
        t_args = [a.cuda() for a in args]
        row = {"model": name, "batch": info["batch"], "seq": info["seq"], "cuda_graph": info["cuda_graph"],
               "launches": info.get("launches")}
        try:
            model32 = model.cuda().float()
            half = copy.deepcopy(model32).half()
            with torch.inference_mode():
                ref = model32(*t_args).float()
                ref16 = half(*t_args).float()
            keep = t_args[1].bool().unsqueeze(-1)  # padded positions are not compared (undefined-ish)
            row["scale"] = float(ref.abs().max())
            row["torch_fp16_max_err"] = float(((ref16 - ref) * keep).abs().max())
            m = ember.load(art, device="cuda")
            ours = m(*t_args).float()
            row["ember_max_err"] = float(((ours - ref) * keep).abs().max())
            # CUDA graphs replay captured kernels: a second, different input must give its own answer.
            other = [torch.randint(0, MINILM_CONFIG["vocab_size"], t_args[0].shape, device="cuda"), t_args[1]]
            with torch.inference_mode():
                ref_b = model32(*other).float()
            ours_b = m(*other).float()
            row["ember_max_err_second_input"] = float(((ours_b - ref_b) * keep).abs().max())
            tol = max(4 * row["torch_fp16_max_err"], 1e-2 * row["scale"])
            row["ember_ok"] = bool(row["ember_max_err"] <= tol and row["ember_max_err_second_input"] <= tol)
            row["ember_ms"] = m.benchmark(*t_args, repeat=200).median_ms
            if profile:  # before/after variants too: where their GPU time goes is the point of comparing them
                row["ember_profile_us"] = _kernel_profile(lambda: m(*t_args))
            if info.get("baseline"):  # an earlier ember (before/after): the peers are timed with the current one
                row["baseline_rev"] = info["baseline"]
                results.append(row)
                print(json.dumps(row), flush=True)
                continue
            with torch.inference_mode():
                row["torch_eager_ms"] = _wall_ms(lambda: half(*t_args))
            if compile_torch and not name.endswith("nograph"):
                for mode in modes:
                    if time.time() > deadline:
                        row[f"torch_compile_{mode}_ms"] = None
                        row.setdefault("notes", []).append(f"torch.compile {mode} skipped: time budget")
                        continue
                    torch._dynamo.reset()
                    t0 = time.perf_counter()
                    cm = torch.compile(half, mode=mode)
                    with torch.inference_mode():
                        for _ in range(3):
                            cm(*t_args)
                        row[f"torch_compile_{mode}_compile_s"] = round(time.perf_counter() - t0, 1)
                        row[f"torch_compile_{mode}_ms"] = _wall_ms(lambda: cm(*t_args))
                for attn in peer_attn:  # the peer on transformers' other attention code (same weights)
                    if time.time() > deadline:
                        break
                    other_half = minilm(info["batch"], attn)[0].cuda().half()
                    mode = modes[0]
                    torch._dynamo.reset()
                    cm = torch.compile(other_half, mode=mode)
                    with torch.inference_mode():
                        for _ in range(3):
                            cm(*t_args)
                        row[f"torch_compile_{mode}_{attn}_attn_ms"] = _wall_ms(lambda: cm(*t_args))
        except Exception as e:  # report every model, failures included
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append(row)
        print(json.dumps(row), flush=True)


def run(a):
    import torch

    t_start = time.time()
    index = json.load(open(os.path.join(a.dir, "index.json")))
    kernels, models = [], []
    if not a.models_only:
        run_kernels(a.dir, index, kernels)
    if not a.kernels_only:
        run_models(a.dir, index, models, not a.no_compile_torch, t_start + a.budget_s,
                   modes=tuple(a.modes.split(",")), only=set(a.only.split(",")) if a.only else None,
                   profile=a.profile, peer_attn=tuple(x for x in a.peer_attn.split(",") if x))
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "target": index["target"],
            "command": " ".join(sys.argv), "kernels": kernels, "models": models}
    os.makedirs(a.out, exist_ok=True)
    out = os.path.join(a.out, "gpu_bench.json")
    with open(out, "w") as f:
        json.dump(info, f, indent=2)
    print_table(info)
    try:
        plot(info, os.path.join(a.out, "gpu_bench.png"))
    except ImportError:
        print("matplotlib missing: make the chart elsewhere with `gpu_bench.py plot gpu_bench.json`")


def print_table(info):
    print(f"\n{info['gpu']}  torch {info['torch']}")
    print(f"{'kernel':24s} {'torch us':>9s} {'ember us':>9s} {'dlight us':>9s} {'ember/torch':>11s}  ok")
    for r in info["kernels"]:
        print(f"{r['kernel']:24s} {r['torch_us']:9.1f} {r.get('ember_us', float('nan')):9.1f} "
              f"{r.get('dlight_us', float('nan')):9.1f} {100 * r.get('ember_vs_torch', 0):10.0f}%  "
              f"{r.get('ember_ok')} {r.get('ember_error', '')}")
    print(f"\n{'model':24s} {'ember':>8s} {'eager':>8s} {'tc-maxat':>8s} {'tc-cudag':>8s}  ok (ms)")
    for r in info["models"]:
        def f(key):
            v = r.get(key)
            return f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8s}"
        print(f"{r['model']:24s} {f('ember_ms')} {f('torch_eager_ms')} "
              f"{f('torch_compile_max-autotune-no-cudagraphs_ms')} {f('torch_compile_reduce-overhead_ms')}  "
              f"{r.get('ember_ok')} {r.get('error', '')}")


def plot(info, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ks = [r for r in info["kernels"] if "ember_us" in r]
    names = [r["kernel"] for r in ks]
    xs = np.arange(len(names))
    for i, (key, label) in enumerate((("torch_us", "torch (cuBLAS)"), ("ember_us", "ember"),
                                      ("dlight_us", "dlight defaults"))):
        vals = [r["torch_us"] / r[key] if r.get(key) else 0 for r in ks]
        axes[0].bar(xs + (i - 1) * 0.27, vals, 0.27, label=label)
    axes[0].set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("speed relative to torch (higher is better)")
    axes[0].axhline(1.0, color="k", lw=0.6)
    axes[0].set_title("fp16 kernels")
    axes[0].legend(fontsize=8)
    ms = info["models"]
    cols = (("ember_ms", "ember"), ("torch_eager_ms", "torch eager"),
            ("torch_compile_max-autotune-no-cudagraphs_ms", "torch.compile max-autotune"),
            ("torch_compile_reduce-overhead_ms", "torch.compile reduce-overhead"))
    xs = np.arange(len(ms))
    for i, (key, label) in enumerate(cols):
        vals = [r.get(key) or 0 for r in ms]
        axes[1].bar(xs + (i - 1.5) * 0.2, vals, 0.2, label=label)
    axes[1].set_xticks(xs, [r["model"] for r in ms], fontsize=8)
    axes[1].set_ylabel("ms per call (lower is better)")
    axes[1].set_title(f"MiniLM architecture, fp16, seq {SEQ}")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{info['gpu']} — {info['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap, sub, p, r = prepare_run_parser(__doc__)
    p.add_argument("--only", default="", help="comma-separated kernel/model names (default: all)")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--gzip-params", action="store_true", help="store the shared params files gzip'ed")
    p.add_argument("--variants", default="", help=f"also compile each model with one fusion off: {VARIANTS}")
    p.add_argument("--policies", default="", help="also compile each model with these POLICIES (tile choices)")
    p.add_argument("--baseline-rev", default="", help="linear kernels: also build the tensor-core rule of this "
                                                       "git revision (before/after)")
    r.add_argument("--no-compile-torch", action="store_true")
    r.add_argument("--kernels-only", action="store_true")
    r.add_argument("--models-only", action="store_true")
    r.add_argument("--only", default="", help="comma-separated model names (default: all in the index)")
    r.add_argument("--profile", action="store_true", help="ember models: GPU time per kernel (torch.profiler)")
    r.add_argument("--peer-attn", default="", help="also time the first --modes mode on transformers' attention "
                                                    "implementation(s) named here, e.g. 'eager'")
    r.add_argument("--modes", default="max-autotune-no-cudagraphs,reduce-overhead",
                   help="torch.compile modes timed as peers, in this order ('default' is torch.compile())")
    r.add_argument("--budget-s", type=float, default=480, help="skip torch.compile modes after this many seconds")
    q = sub.add_parser("plot")
    q.add_argument("json")
    q.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a)
    elif a.cmd == "run":
        run(a)
    else:
        info = json.load(open(a.json))
        plot(info, a.out or a.json.replace(".json", ".png"))


if __name__ == "__main__":
    main()
