"""ember's Hopper GEMM (wgmma + TMA, ember.schedules.gpu.hopper_gemm): which kernels it claims, what it compiles to.

CI has no GPU: kernels are compiled to sm_90a device code here and their CUDA source is checked; the numerics
against torch ran on the H100 (benchmarks/hopper_gemm_bench.py, benchmarks/gpu_bench.py; BENCHMARKS.md), and the
gpu-marked test below repeats them where a Hopper GPU is present.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from ember.schedules import gpu_rules
from ember.schedules.gpu import TensorCoreMatmul
from ember.schedules.gpu.hopper_gemm import (BK, CANDIDATES, MIN_BLOCKS, HopperConfig, HopperGemm, choose_config,
                                             plan_kernel, wgmma_gemm)

from test_gpu_rules import H100, _cuda_or_skip, batched_matmul, compile_cuda, device_source, matmul

SM90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
SM80 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def linear(rows, n, k, epilogue="bias", layout="nn"):
    """ember's fp16 linear as FuseTIR leaves it: x [*rows, K], W [K, N] (or [N, K]), fp32 accumulation, cast to
    fp16, then ``epilogue``: "bias" (+ b[n]), "gelu" (bias, then tanh-GELU in fp32) or "none"."""
    x = te.placeholder((*rows, k), "float16", name="x")
    w = te.placeholder((k, n) if layout == "nn" else (n, k), "float16", name="w")
    b = te.placeholder((n,), "float16", name="b")
    r = te.reduce_axis((0, k), "k")

    def wv(j):
        return w[r, j] if layout == "nn" else w[j, r]

    y = te.compute((*rows, n), lambda *ij: te.sum(x[(*ij[:-1], r)].astype("float32") * wv(ij[-1]).astype("float32"),
                                                  axis=r), name="y")
    h = te.compute((*rows, n), lambda *ij: y[ij].astype("float16"), name="cast")
    if epilogue == "none":
        return te.create_prim_func([x, w, h]).with_attr("global_symbol", "main")
    o = te.compute((*rows, n), lambda *ij: h[ij] + b[ij[-1]], name="bias")
    if epilogue == "gelu":
        def gelu(*ij):
            v = o[ij].astype("float32")
            return (0.5 * v * (1 + te.tanh(0.7978845608 * (v + 0.044715 * v * v * v)))).astype("float16")

        o = te.compute((*rows, n), gelu, name="gelu")
    return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")


def _host_ir(lib) -> str:
    return (lib.mod if hasattr(lib, "mod") else lib).inspect_source()


@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_kernel_compiles_to_wgmma_and_tma_for_sm90a(layout):
    cfg = HopperConfig(consumers=2, bn=256, stages=4, persistent=layout == "nn")
    lib = compile_cuda(tvm.s_tir.Schedule(wgmma_gemm(256, 512, 256, layout, "float16", cfg)))
    src = device_source(lib)
    assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16" in src
    assert "cp.async.bulk.tensor.2d" in src and "mbarrier.try_wait.parity" in src
    assert "__grid_constant__ CUtensorMap" in src  # the tensor maps go by value
    assert "setmaxnreg.inc" in src and "__launch_bounds__(384)" in src
    # trans-b: 0 for W[N, K] (K-major like A), 1 for W[K, N] (N-major smem tile)
    assert re.search(r"m64n256k16_f32_f16_f16_1_1_0_" + ("0" if layout == "nt" else "1"), src)
    # The launch asks for every pipeline stage's shared memory: TMA writes whole tiles, which TVM's buffer
    # compaction could not see through address_of (the first H100 run faulted on a shrunk buffer).
    assert f"store i64 {cfg.smem_bytes()}," in _host_ir(lib)
    assert cfg.smem_bytes() == 4 * (128 + 256) * BK * 2


def test_rule_replaces_a_linear_and_keeps_its_signature_and_epilogue():
    func = linear((32, 128), 384, 384)
    sch = HopperGemm().apply(func, H100, False)
    assert sch is not None
    kernel = sch.mod["main"]
    assert [(p.name, [int(d) for d in p.shape], str(p.dtype)) for p in kernel.params] == \
        [(p.name, [int(d) for d in p.shape], str(p.dtype)) for p in func.params]
    text = kernel.script()
    assert "T.ptx.wgmma(acc[0]" in text and "tirx.is_scheduled" in text
    # rows of the 3-D activation come from the flat row index; the bias is added where the fragment is written to
    # the staging tile (K = 384: staged epilogue), the output takes 16-byte row chunks of that tile
    store = [ln for ln in text.splitlines() if ln.strip().startswith("bias[")]
    assert len(store) == 1 and ") // 128 % 32, " in store[0] and "= stage[" in store[0]
    staged = [ln for ln in text.splitlines() if ln.strip().startswith("stage[")]
    assert len(staged) == 1 and "+ b[" in staged[0]
    src = device_source(compile_cuda(sch))
    assert "wgmma.mma_async" in src and "m64n192k16" in src  # N = 384: 64x192 tiles (choose_config)


def test_gelu_epilogue_is_computed_at_the_store():
    plan = plan_kernel(linear((4096,), 1536, 384, epilogue="gelu"))
    assert plan is not None and "tanh" in plan.store and "b[EPC]" in plan.store
    sch = HopperGemm().apply(linear((4096,), 1536, 384, epilogue="gelu"), H100, False)
    src = device_source(compile_cuda(sch))
    assert "wgmma.mma_async" in src and "tanh" in src


def test_plain_fp16_and_fp32_outputs():
    plan = plan_kernel(matmul(512, 512, 512, "nt"))  # fp16 accumulation asked: rounded once at the end
    assert plan.layout == "nt" and plan.acc_cast == "float16"
    plan = plan_kernel(matmul(512, 512, 512, "nn", out_dtype="float32"))
    assert plan.layout == "nn" and plan.acc_cast is None and 'T.Cast("float32", EPV)' in plan.store


@pytest.mark.parametrize("func,target", [
    (linear((4096,), 384, 384), SM90),  # wgmma needs the arch-specific sm_90a
    (linear((4096,), 384, 384), SM80),
    (linear((4096,), 384, 384), tvm.target.Target({"kind": "metal"})),
    (linear((4096,), 384, 384), tvm.target.Target({"kind": "llvm"})),
    (linear((128,), 384, 384), H100),  # MiniLM batch 1: 3 blocks; the WMMA rule's small tiles + split-K win
    (linear((4096,), 384, 20), H100),  # K not a multiple of 8: TMA rows need 16-byte strides
    (matmul(4096, 4096, 4096, dtype="float32"), H100),
    (batched_matmul(8, 512, 512, 512), H100),
    (matmul(1, 4096, 4096), H100),  # a GEMV
])
def test_rule_declines(func, target):
    assert HopperGemm().apply(func, target, False) is None


def test_rule_declines_symbolic_rows():
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, 384), "float16", name="x")
    w = te.placeholder((384, 384), "float16", name="w")
    r = te.reduce_axis((0, 384), "k")
    y = te.compute((m, 384), lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r))
    func = te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")
    assert HopperGemm().apply(func, H100, False) is None


def test_tile_choice_follows_the_h100_runs(monkeypatch):
    # 4096^3: 128x256 (632 TFLOP/s vs 534 for 128x128); 4096x1536: 128x192; N = 384: 64x192 (128 blocks on 132 SMs,
    # where 128x128 made 96)
    # K <= 2048: the staged epilogue; long K keeps the stores from the fragment
    assert choose_config(4096, 4096, 4096) == HopperConfig(2, 256, 4)
    assert choose_config(4096, 1536, 384) == HopperConfig(2, 192, 4, persistent=True, staged=True)  # 2 waves
    assert choose_config(4096, 384, 384) == HopperConfig(1, 192, 4, staged=True)  # one wave
    assert choose_config(4096, 384, 1536) == HopperConfig(1, 192, 4, staged=True)
    monkeypatch.setenv("EMBER_HOPPER_STAGED", "0")
    assert choose_config(4096, 1536, 384) == HopperConfig(2, 192, 4, persistent=True)
    monkeypatch.delenv("EMBER_HOPPER_STAGED")
    assert choose_config(128, 384, 384) is None and choose_config(128, 1536, 384) is None  # batch 1: WMMA rule
    for cfg in CANDIDATES:
        assert cfg.fits() and cfg.threads == 128 * (cfg.consumers + 1)
    assert MIN_BLOCKS <= 132
    monkeypatch.setenv("EMBER_HOPPER_LEGACY", "1")  # the "before" of benchmarks: 128-row tiles only
    assert choose_config(4096, 384, 384) == HopperConfig(2, 128, 6)


def test_gpu_rules_try_it_before_the_wmma_rule():
    names = [type(r) for r in gpu_rules()]
    assert names.index(HopperGemm) < names.index(TensorCoreMatmul)


# ---- on a Hopper GPU (marked gpu): the kernel against numpy ----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("rows,n,k,layout,epilogue", [
    ((4096,), 4096, 4096, "nt", "none"), ((4096,), 4096, 4096, "nn", "none"), ((32, 128), 384, 384, "nn", "bias"),
    ((4096,), 1536, 384, "nn", "gelu"), ((4096,), 384, 1536, "nn", "bias"), ((1000,), 200, 136, "nt", "bias"),
])
def test_numerics_on_device(rows, n, k, layout, epilogue):
    dev = _cuda_or_skip()
    if "9.0" not in str(getattr(dev, "compute_version", "")):
        pytest.skip("wgmma needs an sm_90 GPU")
    func = linear(rows, n, k, epilogue, layout)
    sch = HopperGemm().apply(func, H100, False) or HopperGemm(HopperConfig(2, 128, 6)).apply(func, H100, False)
    assert sch is not None
    lib = compile_cuda(sch)
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((*rows, k))).astype("float16")
    w = rng.standard_normal((k, n) if layout == "nn" else (n, k)).astype("float16")
    b = rng.standard_normal(n).astype("float16")
    wf = w.astype("float32") if layout == "nn" else w.astype("float32").T
    ref = (x.astype("float32") @ wf).astype("float16").astype("float32")  # the graph rounds to fp16 first
    if epilogue != "none":
        ref = (ref + b.astype("float32")).astype("float16").astype("float32")
    if epilogue == "gelu":
        ref = 0.5 * ref * (1 + np.tanh(0.7978845608 * (ref + 0.044715 * ref ** 3)))
    out = tvm.runtime.tensor(np.full((*rows, n), np.nan, "float16"), dev)
    args = [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)]
    if epilogue != "none":
        args.append(tvm.runtime.tensor(b, dev))
    lib["main"](*args, out)
    # fp32 accumulation over K: the fp16 output's rounding (2^-11 relative) dominates
    np.testing.assert_allclose(out.numpy().astype("float32"), ref, rtol=4e-3, atol=4e-3 * np.abs(ref).max())


def test_erf_gelu_chain_of_blocks_is_folded_into_the_store():
    # What FuseOps leaves for nn.Linear + nn.GELU() under precision="fp16": matmul, cast, bias add, then the erf
    # GELU as several elementwise blocks, one intermediate read twice.
    x = te.placeholder((4096, 384), "float16", name="x")
    w = te.placeholder((384, 1536), "float16", name="w")
    b = te.placeholder((1536,), "float16", name="b")
    r = te.reduce_axis((0, 384), "k")
    y = te.compute((4096, 1536), lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r),
                   name="matmul")
    h = te.compute((4096, 1536), lambda i, j: y[i, j].astype("float16"), name="cast")
    a = te.compute((4096, 1536), lambda i, j: b[j] + h[i, j], name="add")
    s = te.compute((4096, 1536), lambda i, j: a[i, j] * tvm.tirx.const(0.7071067811865476, "float16"), name="mul")
    e = te.compute((4096, 1536), lambda i, j: te.erf(s[i, j].astype("float32")).astype("float16"), name="erf")
    o = te.compute((4096, 1536), lambda i, j: a[i, j] * (tvm.tirx.const(0.5, "float16") * e[i, j] +
                                                          tvm.tirx.const(0.5, "float16")), name="gelu")
    func = te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")
    plan = plan_kernel(func)
    assert plan is not None and "erf" in plan.store and plan.store.count("EPV") == 2
    assert "wgmma.mma_async" in device_source(compile_cuda(HopperGemm().apply(func, H100, False)))



def test_buffers_of_one_name_are_told_apart():
    # FuseTIR can leave two parameters named "lv" (and te names every stage "compute"): the epilogue must still
    # read the right buffers.
    x = te.placeholder((4096, 384), "float16", name="lv")
    w = te.placeholder((384, 1536), "float16", name="lv")
    b = te.placeholder((1536,), "float16", name="lv")
    r = te.reduce_axis((0, 384), "k")
    y = te.compute((4096, 1536), lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r))
    o = te.compute((4096, 1536), lambda i, j: y[i, j].astype("float16") + b[j])
    func = te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")
    plan = plan_kernel(func)
    names = [p.name for p in plan.params]
    assert len(set(names)) == 4 and plan.act.name == names[0] and plan.weight.name == names[1]
    assert f"{names[2]}[EPC]" in plan.store and plan.store.startswith(f"{names[3]}[")
    assert "wgmma.mma_async" in device_source(compile_cuda(HopperGemm().apply(func, H100, False)))


def _reshaped_linear(perm=False):
    """A linear whose epilogue reshapes [4096, 1536] to [32, 128, 1536] before the bias-added GELU (what FuseTIR
    leaves for MiniLM's FFN-up); ``perm``: read the rows transposed instead (not a reshape: must be declined)."""
    x = te.placeholder((4096, 384), "float16", name="x")
    w = te.placeholder((384, 1536), "float16", name="w")
    b = te.placeholder((1536,), "float16", name="b")
    r = te.reduce_axis((0, 384), "k")
    y = te.compute((4096, 1536), lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r),
                   name="matmul")
    a = te.compute((4096, 1536), lambda i, j: b[j] + y[i, j].astype("float16"), name="add")
    if perm:
        rs = te.compute((32, 128, 1536), lambda p, q, j: a[q * 32 + p, j], name="reshape")
    else:
        rs = te.compute((32, 128, 1536), lambda p, q, j: a[(p * 128 + q) % 4096, j % 1536], name="reshape")
    o = te.compute((32, 128, 1536), lambda p, q, j: rs[p, q, j] * (tvm.tirx.const(0.5, "float16") + te.erf(
        (rs[p, q, j] * tvm.tirx.const(0.7071, "float16")).astype("float32")).astype("float16") *
        tvm.tirx.const(0.5, "float16")), name="gelu")
    return te.create_prim_func([x, w, b, o]).with_attr("global_symbol", "main")


def test_reshape_before_the_gelu_epilogue_maps_rows_to_the_output():
    plan = plan_kernel(_reshaped_linear())
    assert plan is not None and plan.store.startswith("gelu[(EPR // 128 % 32), (EPR % 128), EPC] = ")
    assert plan.store.count("EPV") == 2 and "matmul" not in plan.store
    assert "wgmma.mma_async" in device_source(compile_cuda(HopperGemm().apply(_reshaped_linear(), H100, False)))
    assert plan_kernel(_reshaped_linear(perm=True)) is None  # a row permutation is not a reshape


@pytest.mark.slow
def test_ember_compile_puts_a_linear_gelu_model_on_wgmma(tmp_path):
    # End to end through ember.compile for cuda-sm90 (fp16): the FFN-up + GELU kernel as FuseTIR makes it (two
    # parameters named "lv", a reshape to [batch, seq, N] before the erf-GELU) must come out as the wgmma kernel,
    # whose host code builds TMA descriptors; the FFN-down linear too.
    torch = pytest.importorskip("torch")
    import ember

    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    decided = []
    orig = HopperGemm.apply

    def spy(self, func, target, tunable=False):
        sch = orig(self, func, target, tunable)
        if "matmul" in func.script():
            decided.append(sch is not None)
        return sch

    HopperGemm.apply = spy
    try:
        cm = ember.compile(FFN().eval(), (torch.randn(32, 128, 384),), target="cuda-sm90", precision="fp16")
    finally:
        HopperGemm.apply = orig
    assert decided and all(decided), decided
    cm.export(str(tmp_path / "ffn"))
    assert b"cuTensorMapEncodeTiled" in (tmp_path / "ffn" / "model.so").read_bytes()


def test_only_a_multiply_accumulate_is_taken():
    # a sum of two reads that is not x * w (here x + w) must not become a GEMM
    x = te.placeholder((4096, 384), "float16", name="x")
    w = te.placeholder((384, 1536), "float16", name="w")
    r = te.reduce_axis((0, 384), "k")
    y = te.compute((4096, 1536), lambda i, j: te.sum(x[i, r].astype("float32") + w[r, j].astype("float32"), axis=r),
                   name="y")
    func = te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")
    assert plan_kernel(func) is None
    assert plan_kernel(linear((4096,), 1536, 384)) is not None
