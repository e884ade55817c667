"""Issue 7: MiniLM's attention at batch 32 on the H100. The resident tensor-core kernel (K/V of a head in shared memory,
cp.async, ldmatrix) is what ember.compile emits for short sequences, the streaming one stays for long ones; the
[B, 1, S, S] padding mask transformers builds is read as [B, 1, 1, S] (ember.passes.attention_mask), which keeps
the model's numerics (checked on the CPU, where the narrowed mask feeds the CPU kernel)."""

import re

import numpy as np
import pytest
import torch
import tvm
from test_fusion_cuda import _attention_kernels, _cuda_source, needs_nvcc

from ember.compiler import cuda_aot
from ember.compiler.build import compile_model, import_model
from ember.compiler.pipeline import prepare
from ember.compiler.targets import resolve
from ember.passes import attention_kernels as ak
from ember.passes import fusion
from ember.passes.precision import apply_precision

MINILM_B32 = ak.AttentionSpec(batch=32, heads=12, q_len=128, kv_len=128, head_dim=32, dtype="float16",
                              q_layout="bshd", k_layout="bshd", v_layout="bshd", out_layout="bshd", scale=0.17677,
                              mask_shape=(32, 1, 1, 128), mask_dtype="float32")


class PaddedAttention(torch.nn.Module):
    """Self-attention with the padding mask built the way transformers' BERT (eager) builds it: an all-True
    [1, 1, S, 1] position test ANDed with the padding row, expanded to [B, 1, S, S], then where(keep, 0, min)."""

    def __init__(self, d=64, heads=2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x, pad):
        b, s, d = x.shape
        q, k, v = (lin(x).view(b, s, self.h, self.dh).transpose(1, 2) for lin in self.qkv)
        rows = torch.arange(s)[None, None, :, None] >= 0
        keep = (rows & pad.bool()[:, None, None, :]).expand(b, 1, s, s)
        mask = torch.where(keep, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
        p = torch.softmax(q @ k.transpose(-1, -2) * self.dh ** -0.5 + mask, -1)
        return (p @ v).transpose(1, 2).reshape(b, s, d)


def _mask_shape(kernel) -> str:
    """The kernel's mask buffer shape as TVMScript prints it."""
    return re.search(r"Mk: T\.Buffer\((\([^)]*\))", kernel.script()).group(1)


def _padded_inputs(b=3, s=40):
    torch.manual_seed(0)
    pad = torch.ones(b, s, dtype=torch.int64)
    pad[1:, s - 7:] = 0
    return PaddedAttention().eval(), (torch.randn(b, s, 64), pad)


def test_resident_kernel_chosen_for_short_sequences_only():
    assert ak.resident_eligible(MINILM_B32)
    long = ak.AttentionSpec(**{**MINILM_B32.__dict__, "batch": 1, "q_len": 2048, "kv_len": 2048, "head_dim": 64,
                               "mask_shape": (1, 1, 1, 2048)})
    assert not ak.resident_eligible(long)  # K/V of a head: 2 x 2048 x 72 halves, far over shared memory
    assert "flash_attention_mma" in ak.cuda_attention_tensor_cores(long).script()
    func = ak.cuda_attention_tensor_cores(MINILM_B32)
    text = func.script()
    assert "flash_attention_resident" in text
    for helper in ("ember_attn_cp16", "ember_attn_ldsm_x4", "ember_attn_ldsm_x4_t", "ember_attn_cp_wait"):
        assert helper in text, helper
    assert "launch_bounds_min_blocks_per_sm" in text  # the 80-register budget (3 blocks of 8 warps per SM)
    # batch 32: 8 warps (query tiles) per block, one block per (batch, head); batch 1: smaller blocks, more of them
    assert ak._resident_warps(MINILM_B32) == 8
    b1 = ak.AttentionSpec(**{**MINILM_B32.__dict__, "batch": 1})
    assert ak._resident_warps(b1) == 1
    # batch 1 (12 blocks' worth of work): the streaming kernel, measured faster inside the model
    assert "flash_attention_mma" in ak.cuda_attention_tensor_cores(b1).script()
    dyn = ak.AttentionSpec(**{**MINILM_B32.__dict__, "batch": None, "mask_batch_symbolic": True})
    assert "flash_attention_resident" in ak.cuda_attention_tensor_cores(dyn).script()
    with pytest.raises(ValueError, match="not eligible"):
        ak.cuda_attention_tc_resident(long)
    ak_off = ak.RESIDENT
    try:
        ak.RESIDENT = False
        assert "flash_attention_mma" in ak.cuda_attention_tensor_cores(MINILM_B32).script()
    finally:
        ak.RESIDENT = ak_off


def test_padding_mask_is_narrowed_for_the_gpu_kernel():
    """The fused CUDA kernel reads a [B, 1, 1, S] mask (one narrow where-kernel for all layers), not [B, 1, S, S]."""
    m, args = _padded_inputs()
    _, tgt = resolve("cuda-sm90")
    imported, _ = apply_precision(import_model(m, args), "fp16")
    fused = fusion.FuseAttention(tgt)(prepare(imported.mod, fusion=True, target=tgt))
    (kernel,) = _attention_kernels(fused).values()
    assert _mask_shape(kernel) == "(3, 1, 1, 40)"
    # off: the graph's full mask
    saved = fusion.NARROW_MASKS
    try:
        fusion.NARROW_MASKS = frozenset()
        (kernel,) = _attention_kernels(fusion.FuseAttention(tgt)(prepare(imported.mod, fusion=True,
                                                                         target=tgt))).values()
        assert _mask_shape(kernel) == "(3, 1, 40, 40)"
    finally:
        fusion.NARROW_MASKS = saved


def test_narrowed_mask_keeps_the_model_output(monkeypatch):
    """Numerics of the narrowing: on the host (narrowing switched on for the CPU kernel too), fused with the
    narrowed mask vs torch; and a mask whose rows differ (causal) is left alone."""
    from ember.passes.attention_mask import narrow_rows

    seen = {}

    def spy(mask, lookup, emit):
        seen["out"] = narrow_rows(mask, lookup, emit)
        return seen["out"]

    m, args = _padded_inputs()
    monkeypatch.setattr(fusion, "NARROW_MASKS", frozenset({"llvm"}))
    monkeypatch.setattr(fusion, "narrow_rows", spy)
    cm = compile_model(m, args, fusion=True)
    assert "fused_attention" in [k["name"] for k in cm.manifest["kernels"]["ember"]["kernels"]]
    assert seen.get("out") is not None and [int(d) for d in seen["out"].ty.shape.values] == [3, 1, 1, 40]
    with torch.inference_mode():
        ref = m(*args).numpy()
    got = cm(*(a.numpy() for a in args))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    seen.clear()

    class Causal(PaddedAttention):
        def forward(self, x, pad):
            b, s, d = x.shape
            q, k, v = (lin(x).view(b, s, self.h, self.dh).transpose(1, 2) for lin in self.qkv)
            keep = (torch.arange(s)[None, None, :, None] >= torch.arange(s)[None, None, None, :]) & \
                pad.bool()[:, None, None, :]
            mask = torch.where(keep, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
            p = torch.softmax(q @ k.transpose(-1, -2) * self.dh ** -0.5 + mask, -1)
            return (p @ v).transpose(1, 2).reshape(b, s, d)

    causal = Causal().eval()
    causal.load_state_dict(m.state_dict())
    cm = compile_model(causal, args, fusion=True)
    assert "out" in seen and seen["out"] is None, "a causal mask's rows differ: it must not be narrowed"
    with torch.inference_mode():
        np.testing.assert_allclose(cm(*(a.numpy() for a in args)), causal(*args).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_nvcc
def test_resident_kernel_sass_budget(tmp_path):
    """nvcc for sm_90a: the kernel is cp.async + ldmatrix + mma.sync, in 80 registers with (almost) no spills."""
    import subprocess

    name, tgt = resolve("cuda-sm90")
    with cuda_aot.cuda_build_environment(tgt, name), tgt:
        ex = tvm.compile(tvm.IRModule({"main": ak.cuda_attention_tc_resident(MINILM_B32)}), tgt)
    src = _cuda_source(ex.mod)
    for ptx in ("cp.async.cg.shared.global", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "__launch_bounds__(256, 3)"):
        assert ptx in src, ptx
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    res = subprocess.run([cuda_aot.find_nvcc(), "-arch=sm_90a", "-cubin", "-o", str(tmp_path / "k.cubin"), str(cu),
                          "--resource-usage"], capture_output=True, text=True, check=True)
    regs = int(re.search(r"Used (\d+) registers", res.stdout + res.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", res.stdout + res.stderr).group(1))
    assert regs <= 80 and spill <= 32, (regs, spill)
