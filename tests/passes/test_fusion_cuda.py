"""The CUDA flash-attention kernel: compiles to SASS for the H100 (sm_90a) on a machine without a GPU, allocates
no seq x seq buffer at seq 2048, and (on a GPU, ``-m gpu``) equals the unfused attention and torch."""


import numpy as np
import pytest
import tvm
from test_fusion_attention import _allocations, _attention_module, _reference
from tvm import relax

from ember.compiler import cuda_aot
from ember.compiler.pipeline import lower
from ember.compiler.targets import resolve
from ember.passes.fusion import FuseAttention

SEQ, HEADS, DH = 2048, 12, 64
needs_nvcc = pytest.mark.skipif(cuda_aot.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")


def _build(fusion=True, seq=SEQ, dtype="float16"):
    name, tgt = resolve("cuda-sm90")
    mod = _attention_module(seq, HEADS, DH, dtype)
    if fusion:
        mod = FuseAttention(tgt)(mod)
    with cuda_aot.cuda_build_environment(tgt, name), tgt:
        lowered = lower(tgt, fusion=fusion)(mod)
        ex = tvm.compile(mod, tgt, relax_pipeline=lower(tgt, fusion=fusion))
    return lowered, ex


@pytest.mark.slow
@needs_nvcc
def test_flash_attention_compiles_for_sm90_without_seq_by_seq_buffer(tmp_path):
    lowered, ex = _build()
    assert any(gv.name_hint == "fused_attention" for gv in lowered.functions), "attention was not fused"
    big = [s for s in _allocations(lowered) if s[2] >= SEQ * SEQ]
    assert not big, f"seq x seq buffers: {big}"
    lib = str(tmp_path / "attn.so")
    ex.export_library(lib)
    dc = cuda_aot.inspect_device_code(lib)
    assert dc.kind == "fatbin" and dc.archs == ("sm_90a",), dc
    src = [f for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("threadIdx.x" in f.script() and "shared" in f.script() for f in src), (
        "the CUDA attention kernel has no thread bindings / shared-memory tiles")


@pytest.mark.gpu
@pytest.mark.skipif(not tvm.cuda(0).exist,
                    reason="needs an NVIDIA GPU")
def test_flash_attention_on_gpu_matches_reference_and_unfused():
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
