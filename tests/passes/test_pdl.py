"""ember.passes.pdl (every sm_90 kernel triggers its dependents) and the PDL INT4 GEMV inside ember.compile
(precision="fp16", WeightOnly(bits=4, group_size=128), cuda-sm90). No GPU here: the CUDA source is checked, and the
GEMV's numerics through its CPU twin."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import ember
from ember.passes import pdl
from ember.schedules.gpu import quant_gemv as qg

RNG = np.random.default_rng(7)


def _target(name):
    from ember.compiler.targets import resolve

    return resolve(name)[1]


def _scheduled_add(n=4096):
    """A small scheduled elementwise kernel (dlight's fallback rule), as ember's schedules leave them."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    a = te.placeholder((n,), "float32", name="a")
    b = te.compute((n,), lambda i: a[i] + 1.0, name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    with _target("cuda-sm90"):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return mod


def test_trigger_is_first_in_each_launch():
    mod = _scheduled_add()
    func = pdl.add_trigger(mod["main"])
    text = func.script()
    call = f'func_call("{pdl.TRIGGER}"'
    assert text.count(call) == 1
    # inside the thread bindings (blockIdx, threadIdx), before the block that computes
    launch = text.index('thread_binding(')
    last_binding = text.rindex('thread_binding(')
    assert launch < last_binding < text.index(call) < text.rindex("T.sblock(")
    assert pdl.add_trigger(func).same_as(func)  # already triggers: unchanged


def test_pdl_gemv_keeps_its_own_trigger():
    func = qg.weight_only_gemv_staged(4096, 64, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                      **qg.STAGED_FP16_PDL)
    assert pdl.add_trigger(func).same_as(func)


def _with_pdl_gemv(mod):
    """``mod`` plus a PDL GEMV: the pass only touches modules where some kernel can take the early start."""
    gemv = qg.weight_only_gemv_staged(4096, 64, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                      **qg.STAGED_FP16_PDL)
    mod = mod.clone()
    mod["gemv"] = gemv.with_attr("global_symbol", "gemv")
    return mod


def _reshape_kernel():
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    a = te.placeholder((32, 128, 384), "float16", name="a")
    b = te.compute((4096, 384), lambda i, j: a[i // 128, i % 128, j], name="T_reshape")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    with _target("cuda-sm90"):  # scheduled as ember leaves it: launch loops the trigger could go into
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return mod["main"]


def test_trigger_pass_needs_a_pdl_kernel_and_skips_reshapes():
    from tvm.relax.analysis import has_reshape_pattern

    plain = _scheduled_add()
    assert pdl.trigger_pass(_target("cuda-sm90"))(plain)["main"].same_as(plain["main"])  # no PDL kernel: as is
    mod = _with_pdl_gemv(plain)
    reshape = _reshape_kernel()
    assert has_reshape_pattern(reshape)
    mod["reshape"] = reshape
    on = pdl.trigger_pass(_target("cuda-sm90"))(mod)
    assert pdl.TRIGGER in on["main"].script()
    # a reshape must stay the pattern RewriteDataflowReshape turns into a view, not a launched copy
    assert pdl.TRIGGER not in on["reshape"].script()


def test_trigger_pass_targets_and_opt_out(monkeypatch):
    mod = _with_pdl_gemv(_scheduled_add())
    on = pdl.trigger_pass(_target("cuda-sm90"))(mod)
    assert pdl.TRIGGER in on["main"].script()
    for name in ("cuda-sm80", "rocm-gfx942"):  # griddepcontrol is an sm_90 instruction
        assert pdl.trigger_pass(_target(name))(mod)["main"].same_as(mod["main"])
    monkeypatch.setenv(pdl.ENV, "0")
    assert pdl.trigger_pass(_target("cuda-sm90"))(mod)["main"].same_as(mod["main"])


def test_pdl_gemv_twin_fp16_x_fp32_y_matches_numpy():
    """The GEMV ember.compile emits (fp16 x, fp32 y; STAGED_FP16_PDL's 2 warps, depth 2) through its CPU twin
    (fp32 decode, serial lanes, the same copy order), against numpy on the same codes; x rounded to fp16 as the
    caller's cast does."""
    from ember.passes.quantize import qmath

    k, n, m = 3584, 16, 1  # 3 steps (1 still to copy during the decode at depth 2) + 16 tail stripes
    w = RNG.standard_normal((k, n)).astype(np.float32)
    q, sc, z = qmath.quantize_groups(w, 4, 128, True, axis=0, search=False)
    deq = qmath.dequantize_groups(q, sc, z, 128, axis=0)
    x = RNG.standard_normal((m, k)).astype(np.float16)
    words = qg.interleave_words(qg.pack_words(np.ascontiguousarray(q.T), 4))
    scales = qg.interleave_scales(np.ascontiguousarray(sc.T).astype(np.float16), k, 4, 128)
    func = qg.weight_only_gemv_staged(k, n, 4, 128, True, False, "float16", m, _target("cuda-sm90"),
                                      out_dtype="float32", emulate=True, **qg.STAGED_FP16_PDL)
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      tvm.target.Target({"kind": "llvm"}))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (x, words, scales)], out)
    ref = x.astype(np.float64) @ deq.astype(np.float64)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
class _Decode(torch.nn.Module):
    """An LLM decode step's FFN (issue 4's layer, scaled down): LayerNorm -> Linear -> SiLU -> Linear + x."""

    def __init__(self, d=1024, h=2816):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(self.norm(x))))


def _cuda_source(mod) -> str:
    out = []
    for m in mod.imports:
        if m.kind == "cuda":
            out.append(m.inspect_source("cuda") or m.inspect_source(""))
        out.append(_cuda_source(m))
    return "".join(out)


def _kernels(src: str) -> dict:
    """kernel name -> its body, from the CUDA C."""
    parts = re.split(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _compile(precision="fp16"):
    from ember.compiler import cuda_aot

    if cuda_aot.find_nvcc() is None:
        pytest.skip("nvcc missing")
    torch.manual_seed(0)
    model = _Decode().eval()
    x = torch.randn(1, 1024)
    cm = ember.compile(model, (x,), target="cuda-sm90", precision=precision,
                       quantization=ember.WeightOnly(bits=4, group_size=128))
    return _kernels(_cuda_source(cm._executable.mod))


@pytest.mark.slow
def test_fp16_int4_decode_step_gets_pdl_gemv_and_triggers(monkeypatch):
    monkeypatch.delenv(pdl.ENV, raising=False)
    kernels = _compile()
    gemvs = {k: v for k, v in kernels.items() if k.startswith("ember_gpu_wo_gemv")}
    assert len(gemvs) == 2 and all("staged_pdl" in k for k in gemvs), sorted(kernels)
    for name, body in kernels.items():
        assert "ember_grid_dep_launch();" in body, name  # every kernel lets a PDL kernel after it start
        if name in gemvs:  # nothing written to global memory before the wait; x read only after it
            wait = body.index("ember_grid_dep_wait();")
            assert "y_ptr[" not in body[:wait] and "ember_i4_dot8s_gx" not in body[:wait]
            assert "ember_cp_async16" in body[:wait]  # the weights are in flight before it
        else:  # the trigger comes first: before any load or store of the kernel
            first = body.index("ember_grid_dep_launch();")
            assert not [ln for ln in body[:first].splitlines() if "_ptr[" in ln and "=" in ln], name  # (decls only)


@pytest.mark.slow
def test_pdl_opt_out_and_fp32(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "0")
    kernels = _compile()
    assert not any("staged_pdl" in k for k in kernels) and any("_tiled" in k for k in kernels)
    assert not any("griddepcontrol" in b or "ember_grid_dep" in b for b in kernels.values())
    monkeypatch.delenv(pdl.ENV)
    kernels = _compile(precision=None)  # fp32 activations: the fp32-x kernel, no PDL kernel, so no triggers
    assert not any("staged_pdl" in k for k in kernels) and any("_tiled" in k for k in kernels)
    assert not any("ember_grid_dep" in b for b in kernels.values())


def test_pdl_gemv_applies_only_to_fp16_int4_on_sm90(monkeypatch):
    from ember.passes.quantize.gpu import half_activations, pdl_gemv_applies

    monkeypatch.delenv(pdl.ENV, raising=False)
    sm90 = _target("cuda-sm90")
    with half_activations(True):
        assert pdl_gemv_applies(4096, 11008, 4, 128, 1, sm90) and pdl_gemv_applies(11008, 4096, 4, 128, 1, sm90)
        assert not pdl_gemv_applies(4096, 11008, 4, 128, 1, _target("cuda-sm80"))  # no griddepcontrol
        assert not pdl_gemv_applies(4096, 11008, 8, 128, 1, sm90)  # the half2 decode is INT4's
        assert not pdl_gemv_applies(4096, 11008, 4, 128, None, sm90)  # symbolic rows: not the staged kernel
        monkeypatch.setenv(pdl.ENV, "0")
        assert not pdl_gemv_applies(4096, 11008, 4, 128, 1, sm90)
    monkeypatch.delenv(pdl.ENV)
    assert not pdl_gemv_applies(4096, 11008, 4, 128, 1, sm90)  # fp32 activations
