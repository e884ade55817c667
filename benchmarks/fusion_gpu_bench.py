"""ember's fusion on one NVIDIA GPU (issue 6): fused vs unfused, fp16, compiled here and run there.

Step 1, on the build machine (no GPU needed; CUDA compiled ahead of time for sm_90a):
    python benchmarks/fusion_gpu_bench.py prepare --out gpu_artifacts/fusion [--target cuda-sm90] [--only NAMES]
compiles, each with ember's fusion on and off (``compile_model(..., fusion=False)``: TVM's default FuseOps only),
  * attention_s2048_fp16: batch 1, 12 heads, head dim 64, seq 2048, q @ k^T * scale + key-padding mask, softmax,
    @ v, a Relax graph in fp16 (see prepare_attention for why not a torch module);
  * minilm_b1_s128_fp16 / minilm_b1_s128_fp32: the MiniLM-L6 architecture (BertModel with the all-MiniLM-L6-v2
    config, eager attention, random seeded weights, vocabulary cut to 1024), batch 1, seq 128, precision="fp16" /
    fp32. Fused and unfused weights are identical and stored once (params-<hash>.bin). A device-tool call carries
    64 MiB: the runtime bundle (12 MiB) + attention + ONE of the MiniLMs (fp16 23 MiB, fp32 43 MiB) fit, so pick
    with --only (e.g. --only attention_s2048_fp16,minilm_b1_s128_fp32);
and checks, in the lowered module of each, whether an attention kernel was fused and whether any buffer of
seq x seq elements or more is allocated (the allocation walk of tests/passes/test_fusion_attention.py). The
result goes into index.json.

Step 2, on the GPU machine, with TVM's runtime only (shared/gpu/README.md):
    python benchmarks/fusion_gpu_bench.py run gpu_artifacts/fusion --out $OUT
checks fused vs unfused vs torch (fp32 on the GPU as the reference, torch fp16 for its own error) and times each
with ``CompiledModel.benchmark`` (warmup, then >= 200 calls each synchronized; median), the two variants
interleaved in rounds so that clock changes hit both alike. Writes fusion_gpu_bench.json under --out.
"""

from __future__ import annotations

import argparse
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
from benchtools import MINILM_CONFIG, cuda_median_ms, minilm_arch  # noqa: E402

HEADS, DH, ATT_SEQ = 12, 64, 2048
MINILM_SEQ = 128


def attention_inputs():
    """q, k, v in (batch, seq, heads, head_dim) as linear layers give them, and a key-padding mask; fp16, seeded."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, ATT_SEQ, HEADS, DH)).astype("float16") for _ in range(3))
    mask = np.zeros((1, 1, 1, ATT_SEQ), "float16")
    mask[..., ATT_SEQ - 148:] = -60000.0  # key padding: the mask is really used
    return q, k, v, mask


def minilm_model():
    """The MiniLM-L6 architecture (random weights, seeded: the same on both machines) and its inputs."""
    import torch

    # eager attention (matmul, softmax, matmul), as ember.models.minilm loads the real model: with transformers'
    # default "sdpa" the export holds scaled_dot_product_attention, whose import FuseAttention does not match.
    encoder = minilm_arch("eager")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MINILM_CONFIG["vocab_size"], (1, MINILM_SEQ), generator=g)
    mask = torch.ones(1, MINILM_SEQ, dtype=torch.int64)
    return encoder, (ids, mask)


# name -> (factory, seq, precision)
MODELS = {"minilm_b1_s128_fp16": (minilm_model, MINILM_SEQ, "fp16"),
          "minilm_b1_s128_fp32": (minilm_model, MINILM_SEQ, None)}
ATTENTION = "attention_s2048_fp16"


# ----------------------------------------------------------------------------------------------------------------
# Build machine
# ----------------------------------------------------------------------------------------------------------------
def lowered_module(model, args, target, fusion, precision):
    """The module compile_model hands to codegen (same import, precision, prepare and lower steps), for inspection."""
    from ember.compiler.build import _transform_params, import_model
    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.pipeline import lower, prepare
    from ember.compiler.targets import resolve
    from ember.passes.precision import apply_precision

    name, tgt = resolve(target)
    imported = import_model(model, args)
    imported, _ = apply_precision(imported, precision)
    mod = prepare(imported.mod, fusion=fusion, target=tgt)
    mod, _ = _transform_params(mod, imported.params)
    with cuda_build_environment(tgt, name), tgt:
        return lower(tgt, fusion=fusion)(mod)


def inspect_buffers(lowered, seq):
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "passes")]
    from test_fusion_attention import _allocations  # the allocation walk the fusion tests use

    allocs = _allocations(lowered)
    big = [list(a) for a in allocs if a[2] >= seq * seq]
    names = [gv.name_hint for gv in lowered.functions]
    return {"fused_attention_kernel": any("attention" in n for n in names),
            "buffers_ge_seq_x_seq": big, "seq_x_seq_buffer": bool(big),
            "largest_buffer": max((list(a) for a in allocs), key=lambda a: a[2], default=None)}


def prepare_attention(out):
    """Attention alone as a Relax graph in fp16 end to end (the graph tests/passes/test_fusion_cuda.py checks).
    Not a torch module: ember's torch import upcasts fp16 matmul/softmax to fp32 (out_dtype, astype) and
    precision="fp16" keeps softmax in fp32 with casts around it; FuseAttention matches neither (measured:
    EMBER_DEBUG_FUSION=1 says "no match (check 2 / 8)", the launches equal fusion=False's). Plain VM executables,
    run with relax.VirtualMachine on the GPU."""
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "passes")]
    from test_fusion_cuda import _build  # FuseAttention (fused) or not, then ember's lowering, for cuda-sm90

    entry = {"seq": ATT_SEQ, "heads": HEADS, "head_dim": DH, "precision": "float16 graph", "variants": {}}
    for fusion in (True, False):
        t0 = time.perf_counter()
        lowered, ex = _build(fusion, ATT_SEQ, "float16")
        variant = "fused" if fusion else "unfused"
        lib = f"{ATTENTION}.{variant}.so"
        ex.export_library(os.path.join(out, lib))
        info = {"lib": lib, "compile_s": round(time.perf_counter() - t0, 1), **inspect_buffers(lowered, ATT_SEQ)}
        entry["variants"][variant] = info
        print(ATTENTION, variant, json.dumps(info)[:400], flush=True)
    return entry


def prepare(a):
    from ember.compiler.build import compile_model

    os.makedirs(a.out, exist_ok=True)
    index = {"target": a.target, "models": {}}
    path = os.path.join(a.out, "index.json")
    if a.only and os.path.exists(path):  # --only: rebuild those, keep the other entries
        index = json.load(open(path))
    if not a.only or ATTENTION in a.only.split(","):
        index[ATTENTION] = prepare_attention(a.out)
        with open(path, "w") as f:
            json.dump(index, f, indent=2)
    for name, (factory, seq, precision) in MODELS.items():
        if a.only and name not in a.only.split(","):
            continue
        model, args = factory()
        entry = {"seq": seq, "variants": {}}
        for fusion in (True, False):
            t0 = time.perf_counter()
            cm = compile_model(model, args, target=a.target, precision=precision, fusion=fusion)
            variant = "fused" if fusion else "unfused"
            art = os.path.join(a.out, f"{name}.{variant}")
            cm.export(art, overwrite=True)
            # Identical weights (fusion does not change them) are carried once: a device-tool call carries 64 MiB.
            digest = hashlib.sha256(open(os.path.join(art, "params.bin"), "rb").read()).hexdigest()[:16]
            shutil.move(os.path.join(art, "params.bin"), os.path.join(a.out, f"params-{digest}.bin"))
            info = {"dir": os.path.basename(art), "params": f"params-{digest}.bin", "compile_s": round(time.perf_counter() - t0, 1),
                    "launches": cm.manifest["kernels"]["ember"].get("launches")}
            # seq x seq only means "the score matrix" for the attention graph (MiniLM's hidden states at seq
            # 128 are larger than 128 x 128 anyway); MiniLM gets the fused-kernel check only.
            insp = inspect_buffers(lowered_module(model, args, a.target, fusion, precision), seq)
            if not name.startswith("attention"):
                insp = {"fused_attention_kernel": insp["fused_attention_kernel"]}
            info.update(insp)
            entry["variants"][variant] = info
            print(name, variant, json.dumps(info)[:400], flush=True)
        entry["precision"] = precision or "fp32"
        index["models"][name] = entry
        with open(os.path.join(a.out, "index.json"), "w") as f:
            json.dump(index, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# GPU machine
# ----------------------------------------------------------------------------------------------------------------
def _sync_ms(fn, repeat, warmup=10):
    return cuda_median_ms(fn, repeat, warmup)


def run_attention(a, entry):
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine  # the runtime-only bundle has no tvm.relax

    from ember.runtime.load import _load_device_runtime

    row = {"model": ATTENTION, "seq": ATT_SEQ, "build": entry["variants"]}
    try:
        _load_device_runtime("cuda")
        dev = tvm.cuda(0)
        arrs = attention_inputs()
        t = [torch.from_numpy(x).cuda() for x in arrs]
        args = [tvm.runtime.from_dlpack(x) for x in t]
        q, k, v, mask = (x.float().transpose(1, 2) if x.dim() == 4 and x.shape[1] == ATT_SEQ else x.float()
                         for x in t)
        with torch.inference_mode():
            ref = (torch.softmax(q @ k.transpose(-1, -2) * DH ** -0.5 + mask, -1) @ v).transpose(1, 2)
            qh, kh, vh = (x.half().transpose(1, 2) for x in t[:3])
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=t[3])  # noqa
            eager = lambda: torch.softmax((qh @ kh.transpose(-1, -2)) * DH ** -0.5 + t[3], -1) @ vh  # noqa
            row["torch_sdpa_fp16_max_err"] = float((sdpa().float().transpose(1, 2) - ref).abs().max())
            row["torch_eager_fp16_max_err"] = float((eager().float().transpose(1, 2) - ref).abs().max())
        row["scale"] = float(ref.abs().max())
        vms, fns = {}, {}
        for variant, info in entry["variants"].items():
            vms[variant] = VirtualMachine(tvm.runtime.load_module(os.path.join(a.dir, info["lib"])), dev)
            res = vms[variant]["main"](*args)
            try:
                out = torch.from_dlpack(res).float()
            except Exception:  # noqa: BLE001 - older tvm-ffi tensors: through the host
                out = torch.from_numpy(res.numpy()).cuda().float()
            row[f"{variant}_max_err"] = float((out - ref).abs().max())
            fns[variant] = (lambda vm=vms[variant]: vm["main"](*args))
        tol = max(4 * row["torch_eager_fp16_max_err"], 1e-2 * row["scale"])
        row["tolerance"] = tol
        for v in vms:  # per variant: the unfused graph's fp16 scores/softmax may miss what the fused kernel meets
            row[f"{v}_ok"] = bool(row[f"{v}_max_err"] <= tol)
        row["ok"] = bool(all(row[f"{v}_ok"] for v in vms))
        samples = {v: [] for v in fns}
        for _ in range(a.rounds):  # interleaved rounds, as for the models
            for v, fn in fns.items():
                samples[v].append(_sync_ms(fn, a.repeat // 2))
        for v in fns:
            row[f"{v}_ms"] = float(np.median(samples[v]))
            row[f"{v}_ms_rounds"] = samples[v]
        with torch.inference_mode():
            row["torch_eager_fp16_ms"] = _sync_ms(eager, a.repeat // 2)
            row["torch_sdpa_fp16_ms"] = _sync_ms(sdpa, a.repeat // 2)
        row["speedup_fused_over_unfused"] = row["unfused_ms"] / row["fused_ms"]
    except Exception as e:  # report it, then go on to the models
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(json.dumps({k: v for k, v in row.items() if k != "build" and not k.endswith("rounds")}), flush=True)
    return row


def run(a):
    import torch

    import ember

    index = json.load(open(os.path.join(a.dir, "index.json")))
    rows = []
    if ATTENTION in index:
        rows.append(run_attention(a, index[ATTENTION]))
    for name, entry in index.get("models", {}).items():
        factory = MODELS[name][0]  # the same seeded model and inputs as at prepare time
        model, args = factory()
        t_args = [x.cuda() for x in args]
        row = {"model": name, "seq": entry["seq"], "build": entry["variants"]}
        try:
            m32 = model.cuda().float()
            t_args = [x.cuda() for x in args]
            f_args = [x.float() if x.is_floating_point() else x for x in t_args]
            import copy

            m16 = copy.deepcopy(m32).half()
            h_args = [x.half() if x.is_floating_point() else x for x in t_args]
            with torch.inference_mode():
                ref = m32(*f_args).float()
                t16 = m16(*h_args).float()
            row["scale"] = float(ref.abs().max())
            row["torch_fp16_max_err"] = float((t16 - ref).abs().max())
            models, outs = {}, {}
            for variant, info in entry["variants"].items():
                art, shared = os.path.join(a.dir, info["dir"]), os.path.join(a.dir, info.get("params", ""))
                if info.get("params") and not os.path.exists(os.path.join(art, "params.bin")):
                    shutil.copy(shared, os.path.join(art, "params.bin"))
                models[variant] = ember.load(os.path.join(a.dir, info["dir"]), device="cuda")
                outs[variant] = models[variant](*t_args)
                outs[variant] = (outs[variant] if isinstance(outs[variant], torch.Tensor)
                                 else torch.as_tensor(np.asarray(outs[variant])).cuda()).float()
                row[f"{variant}_max_err"] = float((outs[variant] - ref).abs().max())
            row["fused_vs_unfused_max_diff"] = float((outs["fused"] - outs["unfused"]).abs().max())
            # fp16 artifacts: within 4x torch's own fp16 error (or 1% of the scale); fp32: 0.1% of the scale.
            tol = (1e-3 * row["scale"] if entry.get("precision") == "fp32"
                   else max(4 * row["torch_fp16_max_err"], 1e-2 * row["scale"]))
            row["tolerance"] = tol
            row["ok"] = bool(all(row[f"{v}_max_err"] <= tol for v in outs))
            samples = {v: [] for v in models}
            for _ in range(a.rounds):  # interleaved: both variants see the same clocks / thermal state
                for v, m in models.items():
                    samples[v].append(m.benchmark(*t_args, warmup=10, repeat=a.repeat, min_seconds=0).median_ms)
            for v in models:
                row[f"{v}_ms"] = float(np.median(samples[v]))
                row[f"{v}_ms_rounds"] = samples[v]
            with torch.inference_mode():
                for _ in range(10):
                    m16(*h_args)
                torch.cuda.synchronize()
                ts = []
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    m16(*h_args)
                    torch.cuda.synchronize()
                    ts.append((time.perf_counter() - t0) * 1e3)
                row["torch_eager_fp16_ms"] = float(np.median(ts))
            row["speedup_fused_over_unfused"] = row["unfused_ms"] / row["fused_ms"]
        except Exception as e:  # report every model, failures included
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "build" and not k.endswith("rounds")}), flush=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "target": index["target"],
            "command": " ".join(sys.argv), "timing": f"CompiledModel.benchmark median of {a.repeat} synchronized "
            f"calls, median over {a.rounds} interleaved rounds", "results": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "fusion_gpu_bench.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"\n{info['gpu']}")
    for r in rows:
        print(f"{r['model']:24s} fused {r.get('fused_ms', float('nan')):8.3f} ms  unfused "
              f"{r.get('unfused_ms', float('nan')):8.3f} ms  x{r.get('speedup_fused_over_unfused', float('nan')):.2f}"
              f"  ok {r.get('ok')} {r.get('error', '')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="cuda-sm90")
    p.add_argument("--only", default="", help="comma-separated names (default: all)")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--out", default=".")
    r.add_argument("--repeat", type=int, default=200)
    r.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
