"""ember.passes.layout (CPU layouts chosen before legalization) and the matmul rule on the packed kernels:
the rewrites happen, the weight re-layouts are lifted to compile time, the rule tiles packed panels exactly,
and results stay equal -- to the unscheduled kernel and, end to end, to PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from torch import nn

import ember
from ember.compiler.pipeline import TRANSFORM_PARAMS, prepare
from ember.passes.layout import PackWeights, conv_to_nhwc, dense_panel_width, layout_pass
from ember.schedules.cpu import Matmul
from ember.schedules.cpu.matmul import _packed_panel, _analyze
from helpers import assert_same_result, fused_prim_funcs, host_target, loop_kinds, relax_graph

op = relax.op
TARGET = host_target()


def _with_weights(mod, num_input: int):
    return tvm.IRModule({"main": mod["main"].with_attr("num_input", num_input)})


def _calls(mod, name_part: str) -> int:
    text = mod["main"].script()
    return text.count(name_part)


def _kernel(mod, contains):
    funcs = fused_prim_funcs(mod)
    hits = [f for n, f in funcs.items() if contains in n]
    assert len(hits) == 1, sorted(funcs)
    return hits[0]


# ------------------------------------------------------------------------------------------- the rewrites
def test_dense_weight_is_packed_and_lifted():
    panel = dense_panel_width(TARGET, 37, 4 * 48)
    n = 4 * panel
    mod = _with_weights(relax_graph([("x", (37, 53)), ("w", (n, 53)), ("b", (n,))],
                                    lambda x, w, b: op.add(op.matmul(x, op.permute_dims(w)), b)), 1)
    packed = PackWeights(TARGET)(mod)
    assert _calls(packed, "packed_dense") >= 1 and "R.matmul" not in packed["main"].script()
    prepared = prepare(mod, fusion=False, target=TARGET)
    names = [gv.name_hint for gv in prepared.functions]
    assert TRANSFORM_PARAMS in names
    # main reads the packed weight [N/NR, K, NR] as a parameter; the reshape/transpose ran in transform_params
    main_params = [tuple(int(d) for d in p.ty.shape.values) for p in prepared["main"].params]
    assert (n // panel, 53, panel) in main_params
    assert "permute_dims" in prepared[TRANSFORM_PARAMS].script()


def test_not_packed_when_not_a_weight_or_not_a_panel_multiple():
    lanes_panel = dense_panel_width(TARGET, 16, 64)
    # second operand is an input, not a weight: left alone
    act = _with_weights(relax_graph([("x", (16, 32)), ("y", (32, 64))], lambda x, y: op.matmul(x, y)), 2)
    assert "R.matmul" in PackWeights(TARGET)(act)["main"].script()
    # N not a multiple of the panel width: left alone
    odd = _with_weights(relax_graph([("x", (16, 32)), ("w", (32, lanes_panel + 3))], lambda x, w: op.matmul(x, w)), 1)
    assert "R.matmul" in PackWeights(TARGET)(odd)["main"].script()


def test_layout_pass_is_identity_off_cpu():
    mod = _with_weights(relax_graph([("x", (16, 32)), ("w", (32, 128))], lambda x, w: op.matmul(x, w)), 1)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert tvm_ffi.structural_equal(layout_pass(cuda)(mod), mod)
    assert tvm_ffi.structural_equal(layout_pass(None)(mod), mod)


def test_conv_goes_nhwc_and_packed():
    mod = _with_weights(relax_graph([("x", (1, 8, 15, 15)), ("w", (128, 8, 3, 3))],
                                    lambda x, w: op.nn.relu(op.nn.conv2d(x, w, padding=1))), 1)
    out = layout_pass(TARGET, winograd=False)(mod)  # (with Winograd on, this 3x3 conv is rewritten instead)
    text = out["main"].script()
    assert "packed_conv2d_nhwc" in text and "R.nn.conv2d" not in text
    assert 'layout_transform' in text or "permute_dims" in text


# ------------------------------------------------------------------------------------------- the rule on them
@pytest.mark.parametrize("m,k,vecs", [(37, 53, 2), (1, 7, 4), (128, 384, 8), (131, 97, 3)])
def test_rule_on_packed_dense(m, k, vecs):
    """Prime M/K and N a multiple of the panel: the rule tiles N by exactly the panel and keeps results."""
    panel = dense_panel_width(TARGET, m, 48 * vecs)
    n = panel * max(2, vecs // 2)
    mod = _with_weights(relax_graph([("x", (m, k)), ("w", (k, n)), ("b", (n,))],
                                    lambda x, w, b: op.nn.gelu(op.add(op.matmul(x, w), b))), 1)
    func = _kernel(PackWeights(TARGET)(mod), "packed_dense")
    main = s_tir.Schedule(func)
    main = main.get(main.get_sblock("packed_dense"))
    assert _packed_panel(main, _analyze(main).n) == panel
    with TARGET:
        sched = Matmul().apply(func, TARGET, False).mod["main"]
    assert tirx.ForKind.VECTORIZED in loop_kinds(sched)
    assert_same_result(func, sched)


@pytest.mark.parametrize("n,hw,c,f,ks,stride,pad,dil", [
    (1, 15, 8, 64, 3, 1, (1, 1, 1, 1), 1),  # NHWC, one panel: not packed
    (1, 15, 8, 192, 3, 1, (1, 1, 1, 1), 1),
    (2, 17, 5, 96, 3, 2, (1, 0, 2, 1), 1),  # asymmetric padding, stride 2, prime sizes
    (1, 13, 16, 128, 3, 1, (2, 2, 2, 2), 2),  # dilation
    (1, 9, 24, 256, 1, 2, (0, 0, 0, 0), 1),  # 1x1 projection shortcut
])
def test_rule_on_packed_conv(n, hw, c, f, ks, stride, pad, dil):
    def body(x, w, s, r):
        y = op.nn.conv2d(x, w, strides=stride, padding=pad, dilation=dil)
        return op.nn.relu(op.add(op.multiply(y, s), r))

    oh = (hw + pad[0] + pad[2] - dil * (ks - 1) - 1) // stride + 1
    ow = (hw + pad[1] + pad[3] - dil * (ks - 1) - 1) // stride + 1
    mod = _with_weights(relax_graph([("x", (n, c, hw, hw)), ("w", (f, c, ks, ks)), ("s", (1, f, 1, 1)),
                                     ("r", (n, f, oh, ow))], body), 1)
    func = _kernel(layout_pass(TARGET, winograd=False)(mod), "conv2d")
    panel = dense_panel_width(TARGET, ow, f)
    # packed when the channels span several panels; a single-panel HWIO weight is already contiguous
    assert ("packed_conv2d_nhwc" in str(func.script())) == (f > panel and f % panel == 0)
    with TARGET:
        sched = Matmul().apply(func, TARGET, False).mod["main"]
    assert tirx.ForKind.PARALLEL in loop_kinds(sched)
    assert_same_result(func, sched)


# ------------------------------------------------------------------------------------------- end to end
class _ConvNet(nn.Module):
    """Packed convs (64/128 channels), one that is not (48), a grouped conv (kept as is), dilation, stride 2,
    BN + residual + ReLU epilogues, pooling, and dense layers with N a panel multiple and not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 5, 2, 2)
        self.b1 = nn.BatchNorm2d(64)
        self.c2 = nn.Conv2d(64, 64, 3, 1, 2, dilation=2, bias=False)
        self.b2 = nn.BatchNorm2d(64)
        self.g = nn.Conv2d(64, 64, 3, 1, 1, groups=4)
        self.c3 = nn.Conv2d(64, 48, 3, 2, 1)
        self.c4 = nn.Conv2d(48, 128, 1, 1, 0)
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        y = torch.relu(self.g(y))
        y = torch.relu(self.c4(torch.relu(self.c3(y))))
        y = nn.functional.max_pool2d(y, 2)
        return self.fc2(nn.functional.gelu(self.fc1(y.mean(dim=(2, 3)))))


def _net():
    torch.manual_seed(0)
    m = _ConvNet()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_convnet_matches_torch(dynamic):
    model = _net()
    x = torch.randn(2, 3, 31, 31)
    cm = ember.compile(model, (x,), dynamic_batch=dynamic)
    batches = (2, 3) if dynamic else (2,)
    for b in batches:
        xb = torch.randn(b, 3, 31, 31)
        with torch.no_grad():
            ref = model(xb).numpy()
        out = cm(xb.numpy())
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.slow
def test_avx2_target_matches_torch():
    """The same rules and layouts for an AVX2-only CPU (narrower panels, 16 registers) -- this machine runs
    AVX2 code too, so the artifact's numerics are checked, not just its compilation."""
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2})
    assert dense_panel_width(avx2, 128, 384) in (8, 16, 24, 32)  # whole 8-lane ymm vectors, at most 4
    model = _net()
    x = torch.randn(1, 3, 31, 31)
    cm = ember.compile(model, (x,), target=avx2)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(cm(x.numpy()), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
