"""ember.passes.winograd: the F(m, 3) matrices are right, the rewrite happens only where it should (3x3,
stride 1, no dilation, no groups, a weight kernel), the opt-outs work, and compiled models agree with PyTorch
for both tile sizes on odd spatial sizes, padding variants, batch 2 and channel counts that are not a multiple of
the vector width."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from tvm import relax

import ember
from conftest import assert_close
from ember.compiler.targets import resolve
from ember.passes import winograd
from ember.passes.layout import layout_pass

op = relax.op
TARGET = resolve("host")[1]


@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_a_3_tap_correlation(m):
    """1-D F(m, 3): y = A^T [(G g) * (B^T d)] equals the correlation of d (m + 2 values) with g (3 taps)."""
    at, g, bt = winograd.matrices(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, taps = rng.standard_normal(m + 2), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ taps for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), want, rtol=1e-12, atol=1e-12)


def _conv_graph(c, o, hw, k=3, stride=1, padding=1, dilation=1, groups=1, batch=1):
    """Relax conv2d(x, w) with w a weight (num_input=1), as the frontends produce it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, c, hw[0], hw[1]), "float32"))
    w = relax.Var("w", relax.TensorType((o, c // groups, k, k), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(op.nn.relu(op.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation,
                                                groups=groups)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _rewritten(mod, **kw) -> bool:
    return "winograd_gemm" in layout_pass(TARGET, **kw)(mod)["main"].script()


def test_rewrites_3x3_stride_1():
    assert _rewritten(_conv_graph(16, 32, (14, 14)))


@pytest.mark.parametrize("kw", [dict(stride=2), dict(dilation=2, padding=2), dict(groups=2), dict(k=1, padding=0),
                                dict(k=5, padding=2)])
def test_declines_other_convs(kw):
    k = kw.pop("k", 3)
    assert not _rewritten(_conv_graph(16, 32, (14, 14), k=k, **kw))


def test_declines_activation_kernels_and_tiny_images():
    # the second operand is an input, not a weight: its transform could not be lifted to compile time
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 14, 14), "float32"))
    w = relax.Var("w", relax.TensorType((32, 16, 3, 3), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 2}):
        with bb.dataflow():
            out = bb.emit_output(op.nn.conv2d(x, w, padding=1))
        bb.emit_func_output(out)
    assert not _rewritten(bb.get())
    # a 3x3 output is one or two tiles: choose_tile keeps the direct conv; few channels likewise
    assert not _rewritten(_conv_graph(64, 64, (3, 3)))
    assert not _rewritten(_conv_graph(3, 64, (20, 20)))
    assert winograd.choose_tile(56, 56, 64, 64) == 4 and winograd.choose_tile(14, 14, 256, 256) == 2
    assert winograd.choose_tile(7, 7, 512, 512) is None  # weight-stream bound: the direct conv


def test_opt_out(monkeypatch):
    mod = _conv_graph(16, 32, (14, 14))
    assert not _rewritten(mod, winograd=False)
    monkeypatch.setenv("EMBER_WINOGRAD", "0")
    assert not winograd.enabled() and not _rewritten(mod)
    monkeypatch.setenv("EMBER_WINOGRAD", "1")
    monkeypatch.setattr(winograd, "ENABLED", False)
    assert not _rewritten(mod)


class _ConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 (bias) -> BN -> elementwise tail: the epilogues Winograd's output kernel
    fuses (BN shift, bias, ReLU, an add that reads the conv output twice)."""

    def __init__(self, c, o, padding):
        super().__init__()
        self.conv1 = nn.Conv2d(c, o, 3, 1, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(o)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y) * 0.5 + y


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("batch,c,o,hw,padding", [
    (1, 16, 32, (14, 14), 1),
    (2, 5, 20, (9, 11), 1),   # odd sizes (partial last tiles), channels not a multiple of 16 lanes
    (1, 8, 24, (13, 10), 0),  # no padding
    (1, 24, 16, (12, 17), (2, 0)),  # asymmetric per-axis padding
])
def test_matches_torch(monkeypatch, m, batch, c, o, hw, padding):
    monkeypatch.setattr(winograd, "choose_tile", lambda *_: m)
    torch.manual_seed(0)
    model = _ConvBlock(c, o, padding).eval()
    x = torch.randn(batch, c, *hw)
    compiled = ember.compile(model, (x,))
    assert_close(compiled(x.numpy()), model(x).detach().numpy(), what=f"F({m}x{m}, 3x3)")


@pytest.mark.slow
def test_resnet_block_default_choice_matches_torch():
    """The default per-layer choice (F(4x4) for 56x56) on a ResNet-18 layer-1 shape, against torch."""
    torch.manual_seed(1)
    model = _ConvBlock(64, 64, 1).eval()
    x = torch.randn(1, 64, 56, 56)
    compiled = ember.compile(model, (x,))
    assert_close(compiled(x.numpy()), model(x).detach().numpy(), what="ResNet layer-1 block")
