"""HalfNormOutputs (ember.passes.half_norm) and fusion through casts on GPU targets: under precision="fp16" a
post-norm block's layer norm writes fp16, its casts fuse into the add + layer norm kernel and the GELU into the
GEMM, and the model still computes what torch computes (within half precision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvm import relax

import ember
from ember.compiler.build import import_model
from ember.passes import fusion
from ember.passes.half_norm import HalfNormOutputs
from ember.passes.precision import apply_precision


class PostNorm(torch.nn.Module):
    """BERT's layer: h = LN(x + W_o x); out = LN(h + W2 gelu(W1 h)). h feeds a matmul (fp16) and a residual add."""

    def __init__(self, d=64, hidden=256):
        super().__init__()
        self.o, self.fc1, self.fc2 = torch.nn.Linear(d, d), torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln1(x + self.o(x))
        return self.ln2(h + self.fc2(torch.nn.functional.gelu(self.fc1(h))))


def _model():
    torch.manual_seed(0)
    return PostNorm().eval(), torch.randn(2, 24, 64) * 2


def _calls(func, name):
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == name:
            found.append(e)

    relax.analysis.post_order_visit(func.body, visit)
    return found


def test_inner_norm_writes_fp16_and_the_output_norm_is_left_alone():
    model, x = _model()
    imported, _ = apply_precision(import_model(model, (x,)), "fp16")
    before = len(_calls(imported.mod["main"], "relax.astype"))
    main = HalfNormOutputs()(imported.mod)["main"]
    norms = _calls(main, "relax.nn.layer_norm")
    assert len(norms) == 2
    casts = _calls(main, "relax.astype")
    # ln1: one fp16 copy right after it (its only reader), widened once for the residual add; its old
    # reshape + cast in front of fc1 is gone. ln2 is the output: no cast added.
    of_norm = [c for c in casts if isinstance(c.args[0], relax.Var) and any(
        n.same_as(b.value) for n in norms for blk in main.body.blocks for b in blk.bindings
        if b.var.same_as(c.args[0]))]
    assert len(of_norm) == 1 and str(of_norm[0].attrs.dtype) == "float16"
    assert len(casts) == before + 1  # + fp16 copy + widening - the cast in front of fc1
    assert str(main.ret_ty.fields[0].dtype if hasattr(main.ret_ty, "fields") else main.ret_ty.dtype) == "float32"


@pytest.mark.slow
def test_numerics_on_cpu_stay_within_half_precision(monkeypatch):
    """widen=True rounds h for the residual add too (the value fc1 already read): the output moves by about an
    fp16 rounding of h, and stays as close to torch fp32 as fp16 allows. widen=False (the default on GPUs,
    ember.passes.fusion.EXACT_RESIDUAL) only moves the fp16 cast next to the norm: the same numbers."""
    model, x = _model()
    plain = ember.compile(model, (x,), precision="fp16")
    orig = fusion.fusion_passes
    outs = {}
    for widen in (True, False):
        monkeypatch.setattr(fusion, "fusion_passes", lambda t, w=widen: [HalfNormOutputs(widen=w)] + orig(t))
        outs[widen] = np.asarray(ember.compile(model, (x,), precision="fp16")(x.numpy()))
    with torch.inference_mode():
        ref = model(x).numpy()
    a, b = np.asarray(plain(x.numpy())), outs[True]
    scale = np.abs(ref).max()
    assert np.abs(b - a).max() > 0  # the rewrite happened (and changed the residual's rounding)
    assert np.abs(b - ref).max() <= 1e-2 * scale, (np.abs(b - ref).max(), scale)
    assert np.abs(b - a).max() <= 1e-2 * scale
    assert np.abs(outs[False] - a).max() <= 1e-6 * scale  # exact residual: what the graph computed before


@pytest.mark.slow
def test_cuda_kernels_have_no_cast_launches(monkeypatch):
    """Compiled for an H100 (no GPU needed): the fp16 casts live inside the add + layer norm kernels and the GELU
    inside the first GEMM; with the pass and cast-through patterns off (as before) there are separate launches."""
    model, x = _model()
    fused = ember.compile(model, (x,), target="cuda-sm90", precision="fp16")
    kernels = fused.manifest["kernels"]["ember"]["kernels"]
    # one cast kernel remains: the fp32 model input cast to fp16 for the first matmul
    assert _cast_only(kernels) == 1, kernels
    assert any("layer_norm" in k["ops"] and "cast" in k["ops"] for k in kernels), kernels
    assert any("matmul" in k["ops"] and "gelu" in k["ops"] for k in kernels), kernels
    monkeypatch.setattr(fusion, "fusion_passes", lambda t: [fusion.FuseAttention(t), fusion.FuseEpilogues()])
    before = ember.compile(model, (x,), target="cuda-sm90", precision="fp16")
    assert _cast_only(before.manifest["kernels"]["ember"]["kernels"]) == 4  # + ln1's output, 2 before the adds
    assert fused.manifest["kernels"]["ember"]["launches"] < before.manifest["kernels"]["ember"]["launches"]


def _cast_only(kernels):
    """Launches of kernels that only cast (and reshape)."""
    return sum(k["calls"] for k in kernels if not set(k["ops"]) - {"cast", "reshape"})
