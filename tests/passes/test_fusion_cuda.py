"""The CUDA attention kernels: fp16 attention is fused into the tensor-core kernel (mma.sync) for the H100 (sm_90a)
on a machine without a GPU, allocates no seq x seq buffer at seq 2048, and FuseAttention finds attention through
the casts of precision="fp16" and of the torch importer's fp16 graphs. On a GPU (``-m gpu``) the kernels equal
numpy, the unfused graph and torch, and the fused seq-2048 attention is faster than the unfused graph."""


import numpy as np
import pytest
import torch
import tvm
from conftest import assert_close
from test_fusion_attention import SelfAttention, _allocations, _attention_module, _reference
from tvm import relax

from ember.compiler import cuda_aot
from ember.compiler.build import compile_model, import_model
from ember.compiler.pipeline import lower, prepare
from ember.compiler.targets import resolve
from ember.passes.attention_kernels import (AttentionSpec, cuda_attention_tc, cuda_attention_tc_resident,
                                           resident_eligible, tensor_core_eligible)
from ember.passes.fusion import FuseAttention
from ember.passes.precision import apply_precision

SEQ, HEADS, DH = 2048, 12, 64
needs_nvcc = pytest.mark.skipif(cuda_aot.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
needs_gpu = pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs an NVIDIA GPU")


def _cuda():
    return resolve("cuda-sm90")


def _attention_kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if gv.name_hint.startswith("fused_attention")}


def _uses_tensor_cores(func) -> bool:
    return "ptx_legacy.mma" in func.script() and "m16n8k16" in func.script()


def _build(fusion=True, seq=SEQ, dtype="float16", tensor_cores=None):
    name, tgt = _cuda()
    mod = _attention_module(seq, HEADS, DH, dtype)
    if fusion:
        mod = FuseAttention(tgt, tensor_cores=tensor_cores)(mod)
    with cuda_aot.cuda_build_environment(tgt, name), tgt:
        lowered = lower(tgt, fusion=fusion)(mod)
        ex = tvm.compile(mod, tgt, relax_pipeline=lower(tgt, fusion=fusion))
    return lowered, ex


# ---------------------------------------------------------------------------------------------------------------
# no GPU, no nvcc: what the pass and the lowering produce
def test_fp16_attention_lowers_to_tensor_core_kernel_without_seq_by_seq_buffer():
    _, tgt = _cuda()
    fused = FuseAttention(tgt)(_attention_module(SEQ, HEADS, DH, "float16"))
    with tgt:
        lowered = lower(tgt)(fused)
    kernels = _attention_kernels(lowered)
    assert len(kernels) == 1, f"attention was not fused: {[gv.name_hint for gv in lowered.functions]}"
    (kernel,) = kernels.values()
    assert _uses_tensor_cores(kernel), "the fp16 attention kernel does not use mma.sync tensor-core tiles"
    assert "shared" in kernel.script() and "threadIdx.x" in kernel.script()
    big = [s for s in _allocations(lowered) if s[2] >= SEQ * SEQ]
    assert not big, f"seq x seq buffers: {big}"
    # the same graph in fp32 keeps the CUDA-core kernel (fp32 accuracy), and tensor_cores=False forces it
    for mod, tc in ((_attention_module(256, HEADS, DH, "float32"), None), (_attention_module(256, HEADS, DH,
                                                                                           "float16"), False)):
        (k,) = _attention_kernels(FuseAttention(tgt, tensor_cores=tc)(mod)).values()
        assert not _uses_tensor_cores(k)


def test_tensor_core_eligibility_and_refusal():
    base = dict(batch=1, heads=2, q_len=64, kv_len=64, head_dim=64, dtype="float16")
    assert tensor_core_eligible(AttentionSpec(**base))
    for bad in (dict(dtype="float32"), dict(head_dim=40), dict(head_dim=256)):
        spec = AttentionSpec(**{**base, **bad})
        assert not tensor_core_eligible(spec)
        with pytest.raises(ValueError, match="not eligible"):
            cuda_attention_tc(spec)


def _fp16_self_attention(seq=64):
    torch.manual_seed(0)
    m = SelfAttention(d=128, heads=2).eval()  # head dim 64
    x = torch.randn(2, seq, 128)
    mask = torch.ones(2, seq)
    mask[1, seq // 2:] = 0
    return m, x, mask


def test_fuses_through_precision_fp16_casts():
    """precision="fp16" leaves matmul(out_dtype=f32) + astype around the scores, the softmax in fp32 and P cast to
    fp16: still one tensor-core kernel, writing fp16, and no cast pair or head transpose left around it."""
    m, x, mask = _fp16_self_attention()
    _, tgt = _cuda()
    imported, _ = apply_precision(import_model(m, (x, mask)), "fp16")
    mod = prepare(imported.mod, fusion=True, target=tgt)
    fused = FuseAttention(tgt)(mod)
    (kernel,) = _attention_kernels(fused).values()
    assert _uses_tensor_cores(kernel)
    calls = [b for blk in fused["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and b.value.op == tvm.ir.Op.get("relax.call_tir")]
    (site,) = [b for b in calls if b.value.args[0].name_hint.startswith("fused_attention")]
    assert str(site.var.ty.dtype) == "float16"
    text = fused["main"].script()
    assert "R.nn.softmax" not in text
    assert text.count("R.permute_dims") == 0, "head transposes around the fused kernel were not cancelled"
    assert text.count("R.matmul") == 3  # the q, k, v projections; the 2 attention matmuls are gone


def test_fuses_torch_fp16_attention_with_exact_p_on_cuda_only():
    """ember's torch import of fp16 attention: fp32 scores (out_dtype), fp32 softmax, V cast to fp32 for an fp32
    P @ V. On CUDA: fused, reading fp16 q/k/v, writing fp32, P kept exact (hi + lo). On CPU the kernel would round
    the fp32 output to fp16, less accurate than the graph: not fused there."""

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            return (torch.softmax(q @ k.transpose(-1, -2) * 0.125 + mask, -1) @ v).transpose(1, 2)

    args = tuple(torch.randn(1, 96, 2, 64).half() for _ in range(3)) + (torch.zeros(1, 1, 1, 96).half(),)
    for target, fused_expected in (("cuda-sm90", True), ("host", False)):
        _, tgt = resolve(target)
        mod = FuseAttention(tgt)(prepare(import_model(Attention(), args).mod, fusion=True, target=tgt))
        kernels = _attention_kernels(mod)
        assert bool(kernels) == fused_expected, target
        if fused_expected:
            (kernel,) = kernels.values()
            assert _uses_tensor_cores(kernel)
            assert kernel.script().count("m16n8k16") >= 3  # Q K^T, P_hi V, P_lo V
            o = list(kernel.buffer_map.values())[-1] if hasattr(kernel, "buffer_map") else None
            assert o is None or str(o.dtype) == "float32"


@pytest.mark.slow
def test_precision_fp16_fused_equals_unfused_on_cpu():
    """The cast-aware matching computes what the graph computes: on the host (the CPU kernel, fp16 inputs),
    fused vs unfused vs torch fp32, for a model compiled with precision="fp16"."""
    m, x, mask = _fp16_self_attention(seq=24)
    fused = compile_model(m, (x, mask), precision="fp16", fusion=True)
    plain = compile_model(m, (x, mask), precision="fp16", fusion=False)
    names = [k["name"] for k in fused.manifest["kernels"]["ember"]["kernels"]]
    assert "fused_attention" in names
    xs, ms = x.numpy(), mask.numpy()
    with torch.inference_mode():
        ref = m(x, mask).numpy()
    err_fused = np.abs(fused(xs, ms) - ref).max()
    err_plain = np.abs(plain(xs, ms) - ref).max()
    # fp16 weights and activations: ~1e-3 of the output scale; the fused kernel keeps scores in fp32, so it is
    # at least as accurate as the unfused fp16 graph (which rounds the scores to fp16)
    assert err_fused <= 1e-2 * np.abs(ref).max()
    assert err_fused <= 1.25 * err_plain + 1e-4, (err_fused, err_plain)


# ---------------------------------------------------------------------------------------------------------------
# nvcc: SASS for sm_90a
def _cuda_source(mod) -> str:
    """The CUDA C of every cuda module imported (at any depth) by ``mod``."""
    out = []
    for m in mod.imports:
        if m.kind == "cuda":
            out.append(m.inspect_source("cuda") or m.inspect_source(""))
        out.append(_cuda_source(m))
    return "".join(out)


@pytest.mark.slow
@needs_nvcc
def test_flash_attention_compiles_for_sm90_with_mma(tmp_path):
    lowered, ex = _build()
    assert _attention_kernels(lowered), "attention was not fused"
    lib = str(tmp_path / "attn.so")
    ex.export_library(lib)
    dc = cuda_aot.inspect_device_code(lib)
    assert dc.kind == "fatbin" and dc.archs == ("sm_90a",), dc
    src = _cuda_source(ex.mod)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "__shfl_xor_sync" in src  # row max / sum across the 4 lanes of a row, in registers


# ---------------------------------------------------------------------------------------------------------------
# GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,h,sq,sk,d,layout,mask_shape,out_dtype,exact_p", [
    (2, 3, 100, 77, 64, "bshd", (2, 1, 1, 77), None, False),  # tails in both block loops
    (1, 4, 130, 200, 32, "bhsd", (1, 4, 130, 200), "float32", False),
    (1, 2, 64, 64, 16, "bshd", None, None, False),
    (1, 2, 300, 300, 128, "bshd", (1, 1, 1, 300), "float32", True),
    (1, 2, 600, 333, 64, "bshd", (1, 1, 600, 333), None, False),  # 4 warps per block
    (32, 12, 128, 128, 32, "bshd", (32, 1, 1, 128), None, False),  # MiniLM at batch 32 (issue 7)
    (3, 2, 45, 99, 64, "bshd", (3, 1, 1, 99), None, False),  # odd key count: the mask row from registers
])
@pytest.mark.parametrize("kernel", ["stream", "resident"])
def test_tensor_core_kernel_matches_numpy(b, h, sq, sk, d, layout, mask_shape, out_dtype, exact_p, kernel):
    name, tgt = _cuda()
    spec = AttentionSpec(b, h, sq, sk, d, "float16", layout, layout, layout, layout, scale=0.3,
                         mask_shape=mask_shape, out_dtype=out_dtype, exact_p=exact_p)
    if kernel == "resident" and not resident_eligible(spec):
        pytest.skip("K/V of a head do not fit in shared memory")
    make = cuda_attention_tc if kernel == "stream" else cuda_attention_tc_resident
    with cuda_aot.cuda_build_environment(tgt, name), tgt:
        lib = tvm.compile(tvm.IRModule({"main": make(spec)}), tgt)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, s, d)).astype("float16") for s in (sq, sk, sk))
    mask = None
    if mask_shape is not None:
        mask = np.where(rng.random(mask_shape) < 0.25, -1e4, 0).astype("float32")
        mask[..., 1::7] = -np.inf
        mask[..., 0] = 0
    tr = (lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))) if layout == "bshd" else (lambda x: x)
    out = tvm.runtime.tensor(np.zeros(tr(np.zeros((b, h, sq, d))).shape, out_dtype or "float16"), dev)
    args = [tvm.runtime.tensor(tr(x), dev) for x in (q, k, v)] + ([tvm.runtime.tensor(mask, dev)] if mask is not None
                                                                 else [])
    lib["main"](*args, out)
    got = tr(out.numpy().astype("float64"))
    ref = _reference(q, k, v, mask, 0.3)
    assert_close(got, ref, rtol=0, atol=(2e-3 if exact_p else 4e-3) * max(np.abs(ref).max(), 1.0))


@pytest.mark.gpu
@needs_gpu
def test_flash_attention_on_gpu_matches_reference_and_unfused_and_is_faster():
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, SEQ, HEADS, DH)).astype("float16") for _ in range(3))
    mask = np.zeros((1, 1, 1, SEQ), "float16")
    mask[..., 1900:] = -60000.0
    args = [tvm.runtime.tensor(a, dev) for a in (q, k, v, mask)]
    outs, times = {}, {}
    for fusion in (True, False):
        _, ex = _build(fusion)
        vm = relax.VirtualMachine(ex, dev)
        outs[fusion] = vm["main"](*args).numpy().astype("float32")
        timer = vm.time_evaluator("main", dev, number=10, repeat=3)
        times[fusion] = timer(*args).median
    ref = _reference(*(x.astype("float32").transpose(0, 2, 1, 3) for x in (q, k, v)), mask.astype("float32"),
                     DH ** -0.5).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(outs[True], ref, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(outs[True], outs[False], rtol=2e-2, atol=2e-2)
    print(f"attention seq {SEQ} fp16: fused {times[True] * 1e3:.3f} ms, unfused {times[False] * 1e3:.3f} ms")
    assert times[True] < times[False], "the fused attention kernel is slower than the unfused graph"
