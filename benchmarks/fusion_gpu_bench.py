"""ember's fusion on one NVIDIA GPU (issue 6): fused vs unfused, fp16, compiled here and run there.

Step 1, on the build machine (no GPU needed; CUDA compiled ahead of time for sm_90a):
    python benchmarks/fusion_gpu_bench.py prepare --out gpu_artifacts/fusion [--target cuda-sm90] [--only NAMES]
compiles, each with ember's fusion on and off (``compile_model(..., fusion=False)``: TVM's default FuseOps only),
  * attention_kernel_cases: the tensor-core attention kernels (streaming, and resident where K/V fit) alone for odd
    shapes, masks and dtypes (checked against numpy on the GPU);
  * attention_minilm_s128: MiniLM's attention alone (seq 128, 12 heads, dh 32, key padding) at batch 32 and 1:
    streaming vs resident kernel, the [B, 1, S, S] mask vs the narrowed [B, 1, 1, S] one, block-size and chunk
    variants, GPU time per call (torch.profiler) next to torch's SDPA;
  * attention_s2048_fp16: batch 1, 12 heads, head dim 64, seq 2048, q @ k^T * scale + key-padding mask, softmax,
    @ v, a Relax graph in fp16: fused (tensor cores), fused_cuda_core (the CUDA-core kernel) and unfused;
  * attention_torch_fp16_s2048: the same attention as a torch module in fp16, imported by ember (fp32 scores,
    softmax and value product around fp16 inputs);
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
interleaved in rounds so that clock changes hit both alike. ``--profile``: GPU time per kernel of each MiniLM
build (torch.profiler sees TVM's kernels too); ``--compile-torch``: torch.compile reduce-overhead (CUDA graphs)
as the fp16 peer. Writes fusion_gpu_bench.json under --out. (Keep PYTHONPATH=$PWD:$PYTHONPATH there: setup.sh
puts the runtime-only TVM on it.)
"""

from __future__ import annotations

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
from benchtools import MINILM_CONFIG, cuda_kernel_times, cuda_median_ms, minilm_arch, prepare_run_parser  # noqa: E402

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
ATTENTION_TORCH = "attention_torch_fp16_s2048"  # the same attention written in torch and imported (fp16)
KERNELS = "attention_kernel_cases"


class TorchAttention:
    """q, k, v (bshd) and an additive mask -> attention output (bshd), as a torch module (built lazily: the
    GPU machine imports torch only in run)."""

    @staticmethod
    def module():
        import torch

        class Attention(torch.nn.Module):
            def forward(self, q, k, v, mask):
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                s = q @ k.transpose(-1, -2) * DH ** -0.5 + mask
                return (torch.softmax(s, -1) @ v).transpose(1, 2)

        return Attention().eval()


# Tensor-core kernel cases checked against numpy on the GPU: tails in both block loops, head dims 16..128,
# both layouts, masks of every broadcast shape and dtype (with -inf), fp32 output, exact P, a dynamic batch.
KERNEL_CASES = [
    dict(batch=2, heads=3, q_len=100, kv_len=77, head_dim=64, layout="bshd", mask=(2, 1, 1, 77), mask_dtype="float16"),
    dict(batch=1, heads=4, q_len=130, kv_len=200, head_dim=32, layout="bhsd", mask=(1, 4, 130, 200),
         mask_dtype="float32", out_dtype="float32"),
    dict(batch=1, heads=2, q_len=64, kv_len=64, head_dim=16, layout="bshd", mask=None),
    dict(batch=1, heads=2, q_len=300, kv_len=300, head_dim=128, layout="bshd", mask=(1, 1, 1, 300),
         mask_dtype="float16", exact_p=True, out_dtype="float32"),
    dict(batch=1, heads=2, q_len=600, kv_len=333, head_dim=64, layout="bshd", mask=(1, 1, 600, 333),
         mask_dtype="float32"),
    dict(batch=None, run_batch=3, heads=2, q_len=17, kv_len=65, head_dim=64, layout="bshd", mask=(None, 1, 1, 65),
         mask_dtype="float32"),
    dict(batch=1, heads=12, q_len=128, kv_len=128, head_dim=32, layout="bshd", mask=(1, 1, 1, 128),
         mask_dtype="float32"),
    # MiniLM at batch 32 (issue 7): the [B, 1, S, S] mask and the narrowed [B, 1, 1, S] one; fp16 row mask with odd
    # lengths (no shared-memory mask copy), dh 64 / 128 and exact P on the resident kernel
    dict(batch=32, heads=12, q_len=128, kv_len=128, head_dim=32, layout="bshd", mask=(32, 1, 128, 128),
         mask_dtype="float32"),
    dict(batch=32, heads=12, q_len=128, kv_len=128, head_dim=32, layout="bshd", mask=(32, 1, 1, 128),
         mask_dtype="float32"),
    dict(batch=3, heads=2, q_len=45, kv_len=99, head_dim=64, layout="bshd", mask=(3, 1, 1, 99), mask_dtype="float16"),
    dict(batch=2, heads=2, q_len=70, kv_len=64, head_dim=128, layout="bhsd", mask=(2, 2, 1, 64), mask_dtype="float16",
         exact_p=True, out_dtype="float32"),
    dict(batch=None, run_batch=5, heads=3, q_len=128, kv_len=120, head_dim=32, layout="bshd", mask=(None, 1, 1, 120),
         mask_dtype="float32"),
]


def kernel_spec(case):
    from ember.passes.attention_kernels import AttentionSpec

    mask = case.get("mask")
    return AttentionSpec(batch=case["batch"], heads=case["heads"], q_len=case["q_len"], kv_len=case["kv_len"],
                         head_dim=case["head_dim"], dtype="float16", q_layout=case["layout"],
                         k_layout=case["layout"], v_layout=case["layout"], out_layout=case["layout"], scale=0.3,
                         mask_shape=None if mask is None else tuple(1 if m is None else m for m in mask),
                         mask_dtype=case.get("mask_dtype", "float32"),
                         mask_batch_symbolic=mask is not None and mask[0] is None,
                         out_dtype=case.get("out_dtype"), exact_p=case.get("exact_p", False))


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
    """Buffers of at least 2 * seq * seq (the allocation walk reports storage in bytes: a seq x seq fp16 matrix
    is 2 * seq^2 bytes; an fp32 output of 2048 x 12 x 64 is 6 MiB, under it)."""
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "passes")]
    from test_fusion_attention import _allocations  # the allocation walk the fusion tests use

    allocs = _allocations(lowered)
    big = [list(a) for a in allocs if a[2] >= 2 * seq * seq]
    names = [gv.name_hint for gv in lowered.functions]
    return {"fused_attention_kernel": any("attention" in n for n in names),
            "buffers_ge_seq_x_seq": big, "seq_x_seq_buffer": bool(big),
            "largest_buffer": max((list(a) for a in allocs), key=lambda a: a[2], default=None)}


def build_relax(mod, fusion, tensor_cores=None, target="cuda-sm90"):
    """(lowered module, executable) of a Relax module: ember's lowering with its fusion on or off."""
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.pipeline import lower
    from ember.compiler.targets import resolve
    from ember.passes.fusion import FuseAttention

    name, tgt = resolve(target)
    if fusion:
        mod = FuseAttention(tgt, tensor_cores=tensor_cores)(mod)
    with cuda_build_environment(tgt, name), tgt:
        lowered = lower(tgt, fusion=fusion)(mod)
        ex = tvm.compile(mod, tgt, relax_pipeline=lower(tgt, fusion=fusion))
    return lowered, ex


def prepare_torch_attention(out):
    """The attention as a torch module in fp16, imported by ember: matmuls with out_dtype fp32, softmax in fp32
    and V cast to fp32 (FuseAttention sees through those casts and keeps P exact: hi + lo fp16 parts)."""
    import torch

    from ember.compiler.build import import_model
    from ember.compiler.pipeline import prepare as ember_prepare
    from ember.compiler.targets import resolve

    args = tuple(torch.from_numpy(a) for a in attention_inputs())
    entry = {"seq": ATT_SEQ, "heads": HEADS, "head_dim": DH, "precision": "torch fp16 module", "variants": {}}
    for fusion in (True, False):
        t0 = time.perf_counter()
        imported = import_model(TorchAttention.module(), args)
        mod = ember_prepare(imported.mod, fusion=fusion, target=resolve(a_target())[1])
        lowered, ex = build_relax(mod, fusion, target=a_target())
        variant = "fused" if fusion else "unfused"
        lib = f"{ATTENTION_TORCH}.{variant}.so"
        ex.export_library(os.path.join(out, lib))
        info = {"lib": lib, "compile_s": round(time.perf_counter() - t0, 1), **inspect_buffers(lowered, ATT_SEQ)}
        entry["variants"][variant] = info
        print(ATTENTION_TORCH, variant, json.dumps(info)[:400], flush=True)
    return entry


_TARGET = ["cuda-sm90"]


def a_target():
    return _TARGET[0]


def prepare_kernels(out):
    """Each tensor-core case as a standalone library (the kernel alone, called with output buffers)."""
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.targets import resolve
    from ember.passes.attention_kernels import cuda_attention_tc

    from ember.passes.attention_kernels import cuda_attention_tc_resident, resident_eligible

    name, tgt = resolve(a_target())
    cases = []
    for i, case in enumerate(KERNEL_CASES):
        spec = kernel_spec(case)
        # the streaming kernel for every case; the resident one (K/V in shared memory) where it applies
        for kernel, make in (("stream", cuda_attention_tc), ("resident", cuda_attention_tc_resident)):
            if kernel == "resident" and not resident_eligible(spec):
                continue
            lib = f"{KERNELS}.{i}.{kernel}.so"
            with cuda_build_environment(tgt, name), tgt:
                ex = tvm.compile(tvm.IRModule({"main": make(spec)}), tgt)
            ex.export_library(os.path.join(out, lib))
            cases.append({**case, "kernel": kernel, "lib": lib})
    return {"cases": cases}


SHORT = "attention_minilm_s128"  # MiniLM's attention alone: seq 128, 12 heads, dh 32, key padding, b32 and b1
SHORT_BATCHES = (32, 1)


def short_spec(batch, rows_mask):
    from ember.passes.attention_kernels import AttentionSpec

    return AttentionSpec(batch=batch, heads=12, q_len=MINILM_SEQ, kv_len=MINILM_SEQ, head_dim=32, dtype="float16",
                         q_layout="bshd", k_layout="bshd", v_layout="bshd", out_layout="bshd",
                         scale=float(np.float32(32 ** -0.5)),
                         mask_shape=(batch, 1, 1 if rows_mask else MINILM_SEQ, MINILM_SEQ), mask_dtype="float32")


def prepare_short(out):
    """Both tensor-core kernels, each with the [B, 1, S, S] mask MiniLM's graph has and the [B, 1, 1, S] one
    ember.passes.attention_mask narrows it to."""
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.targets import resolve
    from ember.passes.attention_kernels import cuda_attention_tc, cuda_attention_tc_resident

    name, tgt = resolve(a_target())
    variants = []
    for batch in SHORT_BATCHES:
        for kernel, make in (("stream", cuda_attention_tc), ("resident", cuda_attention_tc_resident)):
            for rows in (False, True):
                lib = f"{SHORT}.b{batch}.{kernel}.{'rowmask' if rows else 'fullmask'}.so"
                with cuda_build_environment(tgt, name), tgt:
                    ex = tvm.compile(tvm.IRModule({"main": make(short_spec(batch, rows))}), tgt)
                ex.export_library(os.path.join(out, lib))
                variants.append({"batch": batch, "kernel": kernel, "row_mask": rows, "lib": lib})
        # the resident kernel's block size and chunk, measured rather than guessed (row mask: what ember emits)
        for kernel, kw in (("resident_w2", dict(warps=2)), ("resident_w4", dict(warps=4)),
                           ("resident_w8", dict(warps=8)), ("resident_c64", dict(chunk=64)),
                           ("resident_c16", dict(chunk=16))):
            lib = f"{SHORT}.b{batch}.{kernel}.rowmask.so"
            with cuda_build_environment(tgt, name), tgt:
                ex = tvm.compile(tvm.IRModule({"main": cuda_attention_tc_resident(short_spec(batch, True), **kw)}),
                                 tgt)
            ex.export_library(os.path.join(out, lib))
            variants.append({"batch": batch, "kernel": kernel, "row_mask": True, "lib": lib})
    return {"variants": variants}


def run_short(a, entry):
    """Each variant against numpy (float64), GPU time per call (torch.profiler, kernel only), and torch's SDPA /
    eager fp16 attention on the same tensors with the [B, 1, S, S] mask as peers."""
    import torch

    from ember.runtime.load import _load_device_runtime

    import tvm  # noqa: E402

    _load_device_runtime("cuda")
    dev = tvm.cuda(0)
    rows_out = []
    for batch in SHORT_BATCHES:
        rng = np.random.default_rng(batch)
        s_, h, d = MINILM_SEQ, 12, 32
        q, k, v = (rng.standard_normal((batch, s_, h, d)).astype("float16") for _ in range(3))
        keep = np.ones((batch, s_), bool)
        if batch > 1:
            keep[:, s_ - 16:] = False  # MiniLM's padding at batch 32
        row = np.where(keep, 0.0, np.finfo(np.float32).min).astype("float32")[:, None, None, :]
        full = np.ascontiguousarray(np.broadcast_to(row, (batch, 1, s_, s_)))
        scale = float(np.float32(d ** -0.5))
        ref = _reference64(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), full, scale).transpose(0, 2, 1, 3)
        res = {"batch": batch, "scale": float(np.abs(ref).max())}
        tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
        tfull = torch.from_numpy(full).cuda()
        args = {False: [tvm.runtime.from_dlpack(x) for x in (tq, tk, tv, tfull)],
                True: [tvm.runtime.from_dlpack(x) for x in (tq, tk, tv, torch.from_numpy(row).cuda())]}
        for var in entry["variants"]:
            if var["batch"] != batch:
                continue
            key = f"{var['kernel']}_{'rowmask' if var['row_mask'] else 'fullmask'}"
            try:
                f = tvm.runtime.load_module(os.path.join(a.dir, var["lib"]))["main"]
                out = torch.empty((batch, s_, h, d), dtype=torch.float16, device="cuda")
                tout = tvm.runtime.from_dlpack(out)
                f(*args[var["row_mask"]], tout)
                torch.cuda.synchronize()
                err = float(np.abs(out.float().cpu().numpy().astype(np.float64) - ref).max())
                times = cuda_kernel_times(lambda f=f, m=var["row_mask"], tout=tout: f(*args[m], tout), calls=50,
                                          warmup=5)
                res[f"{key}_max_err"] = err
                res[f"{key}_ok"] = bool(np.isfinite(err) and err <= 4e-3 * max(res["scale"], 1.0))
                res[f"{key}_us"] = round(sum(t for _, _, t in times), 2)
            except Exception as e:  # noqa: BLE001 - report each variant
                import traceback

                traceback.print_exc()
                res[f"{key}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        qh, kh, vh = (x.transpose(1, 2) for x in (tq, tk, tv))
        with torch.inference_mode():
            for peer, mask in (("sdpa_fullmask", tfull.half()), ("sdpa_rowmask", torch.from_numpy(row).cuda().half())):
                fn = (lambda m=mask: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=m))
                o = fn().transpose(1, 2).float().cpu().numpy()
                res[f"torch_{peer}_max_err"] = float(np.abs(o - ref).max())
                res[f"torch_{peer}_us"] = round(sum(t for _, _, t in cuda_kernel_times(fn, calls=50, warmup=5)), 2)
                res[f"torch_{peer}_kernels"] = [n for n, _, _ in cuda_kernel_times(fn, calls=2, warmup=1)][:4]
        print(json.dumps(res), flush=True)
        rows_out.append(res)
    ok = all(v for r in rows_out for kk, v in r.items() if kk.endswith("_ok"))
    return {"model": SHORT, "rows": rows_out, "ok": ok}


def prepare_attention(out):
    """Attention alone as a Relax graph in fp16 end to end (the graph tests/passes/test_fusion_cuda.py checks).
    Not a torch module: ember's torch import upcasts fp16 matmul/softmax to fp32 (out_dtype, astype) and
    precision="fp16" keeps softmax in fp32 with casts around it; FuseAttention matches neither (measured:
    EMBER_DEBUG_FUSION=1 says "no match (check 2 / 8)", the launches equal fusion=False's). Plain VM executables,
    run with relax.VirtualMachine on the GPU."""
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "passes")]
    from test_fusion_attention import _attention_module

    entry = {"seq": ATT_SEQ, "heads": HEADS, "head_dim": DH, "precision": "float16 graph", "variants": {}}
    # fused: the tensor-core kernel; fused_cuda_core: the CUDA-core kernel of before (for comparison)
    for variant, fusion, tc in (("fused", True, None), ("fused_cuda_core", True, False), ("unfused", False, None)):
        t0 = time.perf_counter()
        lowered, ex = build_relax(_attention_module(ATT_SEQ, HEADS, DH, "float16"), fusion, tc, a_target())
        lib = f"{ATTENTION}.{variant}.so"
        ex.export_library(os.path.join(out, lib))
        info = {"lib": lib, "compile_s": round(time.perf_counter() - t0, 1), **inspect_buffers(lowered, ATT_SEQ)}
        entry["variants"][variant] = info
        print(ATTENTION, variant, json.dumps(info)[:400], flush=True)
    return entry


def prepare(a):
    from ember.compiler.build import compile_model

    os.makedirs(a.out, exist_ok=True)
    _TARGET[0] = a.target
    index = {"target": a.target, "models": {}}
    path = os.path.join(a.out, "index.json")
    if a.only and os.path.exists(path):  # --only: rebuild those, keep the other entries
        index = json.load(open(path))
    for key, fn in ((KERNELS, prepare_kernels), (SHORT, prepare_short), (ATTENTION, prepare_attention),
                    (ATTENTION_TORCH, prepare_torch_attention)):
        if not a.only or key in a.only.split(","):
            index[key] = fn(a.out)
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


def _reference64(q, k, v, mask, scale):
    """numpy float64 attention, (b, h, s, d) inputs."""
    s_ = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * scale
    if mask is not None:
        s_ = s_ + mask.astype(np.float64)
    s_ = s_ - s_.max(-1, keepdims=True)
    p = np.exp(s_)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", p, v.astype(np.float64))


def run_kernels(a, entry):
    """Every tensor-core case against numpy (float64) on random inputs; error relative to the output scale."""
    from ember.runtime.load import _load_device_runtime  # first: it finds the runtime-only TVM of the GPU machine

    import tvm  # noqa: E402

    _load_device_runtime("cuda")
    dev = tvm.cuda(0)
    rows = []
    for i, case in enumerate(entry["cases"]):
        row = {k: v for k, v in case.items() if k != "lib"}
        try:
            rng = np.random.default_rng(i)
            b = case["batch"] or case["run_batch"]
            h, sq, sk, d = case["heads"], case["q_len"], case["kv_len"], case["head_dim"]
            q, k, v = (rng.standard_normal((b, h, n, d)).astype("float16") for n in (sq, sk, sk))
            mask = None
            if case.get("mask") is not None:
                shape = tuple(b if m is None else m for m in case["mask"])
                mask = np.where(rng.random(shape) < 0.25, -1e4, 0.0).astype(case["mask_dtype"])
                mask[..., 1::7] = -np.inf  # -inf keys too
                mask[..., 0] = 0  # every row keeps a key
            tr = (lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))) if case["layout"] == "bshd" else (lambda x: x)
            out_dtype = case.get("out_dtype") or "float16"
            out = tvm.runtime.tensor(np.zeros(tr(np.zeros((b, h, sq, d))).shape, out_dtype), dev)
            args = [tvm.runtime.tensor(tr(x), dev) for x in (q, k, v)]
            if mask is not None:
                args.append(tvm.runtime.tensor(mask, dev))
            f = tvm.runtime.load_module(os.path.join(a.dir, case["lib"]))["main"]
            f(*args, out)
            dev.sync()
            got = out.numpy().astype(np.float64)
            got = got.transpose(0, 2, 1, 3) if case["layout"] == "bshd" else got
            ref = _reference64(q, k, v, mask, 0.3)
            row["scale"] = float(np.abs(ref).max())
            row["max_err"] = float(np.abs(got - ref).max())
            row["finite"] = bool(np.isfinite(got).all())
            # fp16 output: its own rounding (2^-11 relative) plus P in fp16; fp32 output with exact P: far less
            tol = (2e-3 if case.get("exact_p") else 4e-3) * max(row["scale"], 1.0)
            row["tolerance"] = tol
            row["ok"] = bool(row["finite"] and row["max_err"] <= tol)
        except Exception as e:  # noqa: BLE001 - report each case
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["ok"] = False
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"model": KERNELS, "cases": rows, "ok": all(r["ok"] for r in rows)}


def run_attention(a, entry, name=ATTENTION):
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine  # the runtime-only bundle has no tvm.relax

    from ember.runtime.load import _load_device_runtime

    row = {"model": name, "seq": ATT_SEQ, "build": entry["variants"]}
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
            if not hasattr(res, "shape"):  # a tuple of outputs (the torch import returns one)
                res = res[0]
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
        # FLOP rate of the fused kernel (4 * s^2 * d per head: two matmuls), for scale
        row["fused_tflops"] = 4 * ATT_SEQ * ATT_SEQ * DH * HEADS / (row["fused_ms"] * 1e-3) / 1e12
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
    if KERNELS in index:
        rows.append(run_kernels(a, index[KERNELS]))
    if SHORT in index:
        rows.append(run_short(a, index[SHORT]))
    for name in (ATTENTION, ATTENTION_TORCH):
        if name in index:
            rows.append(run_attention(a, index[name], name))
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
            if a.profile:
                for v, m in models.items():
                    dev_in = m._prepare(t_args, {})[1]  # pylint: disable=protected-access
                    row[f"profile_{v}"] = profile_kernels(lambda m=m, dev_in=dev_in: m.run_device(dev_in))
            if a.compile_torch and entry.get("precision") != "fp32":
                try:
                    torch._dynamo.reset()
                    t0 = time.perf_counter()
                    cm = torch.compile(m16, mode="reduce-overhead")
                    with torch.inference_mode():
                        for _ in range(3):
                            cm(*h_args)
                        row["torch_compile_cuda_graphs_compile_s"] = round(time.perf_counter() - t0, 1)
                        row["torch_compile_cuda_graphs_ms"] = _sync_ms(lambda: cm(*h_args), a.repeat)
                except Exception as e:  # noqa: BLE001 - the peer failing is a result too
                    row["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
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


def profile_kernels(fn, iters=20):
    """GPU time per kernel name over ``iters`` calls (benchtools.cuda_kernel_times), sorted; us."""
    rows = cuda_kernel_times(fn, calls=iters, warmup=5)
    return {"total_us": sum(r[2] for r in rows), "kernels": [{"name": k, "us_per_call": round(t, 2), "launches": int(n)}
                                                            for k, n, t in rows[:30]]}


def main():
    ap, _, p, r = prepare_run_parser(__doc__)
    p.add_argument("--only", default="", help="comma-separated names (default: all)")
    r.add_argument("--repeat", type=int, default=200)
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--profile", action="store_true", help="per-kernel GPU time of the fused MiniLMs")
    r.add_argument("--compile-torch", action="store_true", help="torch.compile reduce-overhead peer (fp16)")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
