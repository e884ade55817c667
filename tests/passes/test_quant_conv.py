"""INT8 conv2d: kernels against the exact integer math (numpy), the graph rewrite (bias, BatchNorm, symbolic batch)
against PyTorch, and what is left fp32."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import ember
from ember.compiler.targets import resolve
from ember.passes.quantize import conv as cv
from ember.passes.quantize import conv_kernels as ck
from ember.passes.quantize import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import CNN, randomize_bn  # noqa: E402

HOST = resolve("host")[1]
AVX2 = resolve("x86-avx2")[1]  # no VNNI: plain int32 vector code
AVX_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "num-cores": 2})  # 256-bit vpdpbusd, 8 lanes


def _module(func):
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _run_conv(x, w, bias, spec, target, clip=None, activation=None):
    """quantize_pad_nhwc + int8_conv2d for ``target`` on this CPU; returns (NCHW output, scale, packed)."""
    lanes = kernels.int8_lanes(target)
    packed = cv.pack_weight(w, spec, lanes)
    qf = ck.quantize_pad_nhwc(spec.c, spec.h, spec.w, spec.pads, 127, clip is not None, target)
    cf = ck.int8_conv2d(spec.c, spec.h, spec.w, spec.o, spec.kernel, spec.strides, spec.dilation, spec.pads, lanes,
                        bias is not None, target, activation=activation)
    dev = tvm.cpu()
    pt, pl, pb, pr = spec.pads
    b = x.shape[0]
    codes = tvm.runtime.tensor(np.zeros((b, spec.h + pt + pb, spec.w + pl + pr, ck.padded_channels(spec.c)),
                                        np.uint8), dev)
    scale = tvm.runtime.tensor(np.zeros(1, np.float32), dev)
    qargs = [tvm.runtime.tensor(x, dev)] + ([tvm.runtime.tensor(np.array([clip], np.float32), dev)]
                                            if clip is not None else [])
    tvm.compile(_module(qf), target=target)["main"](*qargs, codes, scale)
    oh, ow = spec.out_hw
    out = tvm.runtime.tensor(np.zeros((b, spec.o, oh * ow), np.float32), dev)
    cargs = [codes] + [tvm.runtime.tensor(packed[k], dev) for k in ("wpacked", "wsum")] + [scale] + \
        [tvm.runtime.tensor(packed["wscale"], dev)] + ([tvm.runtime.tensor(bias, dev)] if bias is not None else [])
    tvm.compile(_module(cf), target=target)["main"](*cargs, out)
    return out.numpy().reshape(b, spec.o, oh, ow), float(scale.numpy()[0]), packed


CASES = [  # (B, C, H, W, O, kernel, stride, pads (t, l, b, r), dilation)
    (2, 3, 9, 11, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # odd sizes, C and O not multiples of 4 / 16
    (3, 16, 8, 8, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 5, 13, 12, 17, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # stride 2
    (2, 8, 10, 10, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # 1x1
    (1, 24, 7, 7, 40, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),  # strided 1x1 (ResNet shortcut)
    (1, 3, 30, 29, 64, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),  # ResNet stem
    (1, 6, 12, 12, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),  # dilation
    (2, 4, 9, 9, 12, (3, 2), (1, 2), (0, 1, 2, 0), (1, 1)),  # rectangular kernel, uneven padding
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[1]}o{c[4]}k{c[5][0]}s{c[6][0]}" for c in CASES])
def test_int8_conv_kernel_exact(case):
    b, c, h, w_, o, k, s, pads, d = case
    rng = np.random.default_rng(hash(case) % 2**32)
    spec = cv.ConvSpec(c, h, w_, o, k, s, d, pads)
    x = rng.standard_normal((b, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((o, c) + k).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    got, xs, packed = _run_conv(x, w, bias, spec, HOST)
    q, xs_ref = cv.quantize_tensor(x)
    assert xs == pytest.approx(float(xs_ref), rel=1e-6)
    acc = cv.conv2d(q, packed["q"], spec)  # exact int64 accumulators of the quantized math
    rec = (got - bias[None, :, None, None]) / (xs * packed["wscale"][None, :, None, None])
    # the epilogue's fp32 rounding only: |acc| < 2^17 here, so well under one unit
    np.testing.assert_array_equal(np.round(rec), acc)
    # and within quantization error of the fp32 conv
    ref = cv.conv2d(x, w, spec, bias)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03


def test_int8_conv_kernel_relu_epilogue():
    rng = np.random.default_rng(2)
    spec = cv.ConvSpec(5, 9, 9, 24, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    x = rng.standard_normal((2, 5, 9, 9)).astype(np.float32)
    w = rng.standard_normal((24, 5, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    plain, _, _ = _run_conv(x, w, bias, spec, HOST)
    relu, _, _ = _run_conv(x, w, bias, spec, HOST, activation="relu")
    assert (plain < 0).any()
    np.testing.assert_array_equal(relu, np.maximum(plain, 0))


def test_int8_conv_kernel_static_clip_and_avx2():
    """A calibrated clip (values beyond it saturate) and the non-VNNI code path give the same integer math."""
    rng = np.random.default_rng(1)
    spec = cv.ConvSpec(6, 9, 9, 20, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    x = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)
    w = rng.standard_normal((20, 6, 3, 3)).astype(np.float32)
    assert kernels.vnni_lanes(AVX_VNNI) == 8
    for target in (HOST, AVX2, AVX_VNNI):
        got, xs, packed = _run_conv(x, w, None, spec, target, clip=1.5)
        q, xs_ref = cv.quantize_tensor(x, clip=1.5)
        assert np.abs(q).max() == 127 and xs == pytest.approx(1.5 / 127, rel=1e-6)
        acc = cv.conv2d(q, packed["q"], spec)
        np.testing.assert_array_equal(np.round(got / (xs * packed["wscale"][None, :, None, None])), acc)


@pytest.mark.parametrize("name", ["arm64", "arm64-dotprod"])
def test_int8_conv_builds_for_arm64(name):
    arm = resolve(name)[1]
    f = ck.int8_conv2d(16, 8, 8, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), kernels.int8_lanes(arm), True, arm)
    tvm.compile(_module(f), target=arm)  # cross-compiles (cannot run here)


def test_batch_norm_fold_matches_torch():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
    m = randomize_bn(nn.Sequential(conv, bn)).eval()
    x = torch.randn(2, 4, 5, 5)
    from ember.compiler.build import import_model
    from ember.passes.quantize.graph import find_sites

    imp = import_model(m, (x,))
    sites = find_sites(imp.mod["main"], imp.param_names, embeddings=False, convs=True)
    assert [s.kind for s in sites] == ["conv2d"] and sites[0].bn is not None and sites[0].conv_bias is not None
    w, b = cv.folded_weight_bias(sites[0], imp.params)
    np.testing.assert_allclose(cv.conv2d(x.numpy(), w, sites[0].conv, b), m(x).detach().numpy(), atol=1e-5)


class _Mixed(nn.Module):
    """A strided stem, a depthwise conv (left fp32), a 1x1 conv with bias, BN, a residual, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.pw(self.dw(y) + y))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_compile_int8_cnn(scheme, tmp_path):
    torch.manual_seed(0)
    m = randomize_bn(CNN()).eval()
    calib = [(torch.randn(4, 3, 16, 16).numpy(),) for _ in range(3)]
    q = ember.Int8Dynamic() if scheme == "dynamic" else ember.Int8Static(calibration=calib, method="percentile")
    cm = ember.compile(m, (torch.randn(2, 3, 16, 16),), dynamic_batch=True, quantization=q)
    rep = cm.manifest["compression"]["quantization"]
    convs = [e for e in rep["layers"] if e["kind"] == "conv2d"]
    assert len(convs) == 8 and all(e["batch_norm_folded"] and e["output_error"] < 0.03 for e in convs)
    # stem and each block's first conv: conv + BN + ReLU, the ReLU in the epilogue
    assert sum(e.get("epilogue") == "relu" for e in convs) == 4
    assert "fp32_convs" not in rep and rep["end_to_end"]["mean"] > 0.999
    for b in (1, 5):  # symbolic batch
        x = torch.randn(b, 3, 16, 16)
        ref = m(x).detach().numpy()
        got = np.asarray(cm(x.numpy()))
        assert got.shape == ref.shape
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
    # the artifact (int8 conv kernels + packed weights) loads with the runtime alone and gives the same outputs
    x = torch.randn(3, 3, 16, 16).numpy()
    np.testing.assert_allclose(np.asarray(ember.load(cm.export(str(tmp_path / "q")))(x)), np.asarray(cm(x)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_int8_depthwise_stays_fp32():
    torch.manual_seed(0)
    m = randomize_bn(_Mixed()).eval()
    x = torch.randn(3, 3, 15, 15)
    cm = ember.compile(m, (x,), dynamic_batch=True, quantization=ember.Int8Dynamic())
    rep = cm.manifest["compression"]["quantization"]
    kinds = {e["layer"]: e["kind"] for e in rep["layers"]}
    assert kinds == {"p_stem_0_weight": "conv2d", "p_pw_weight": "conv2d", "p_head_weight": "matmul"}
    assert [e["layer"] for e in rep["fp32_convs"]] == ["p_dw_weight"] and "groups=8" in rep["fp32_convs"][0]["reason"]
    ref = m(x).detach().numpy()
    got = np.asarray(cm(x.numpy()))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


@pytest.mark.slow
def test_compile_int8_onnx_conv_bias_bn(tmp_path):
    """The ONNX importer's convs (out_dtype unset, bias as reshape + add, BN with bound running-stat outputs)."""
    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(16 * 8 * 8, 10))).eval()
    x = torch.randn(2, 3, 16, 16)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                      do_constant_folding=False)
    cm = ember.compile(path, quantization=ember.Int8Dynamic())
    rep = cm.manifest["compression"]["quantization"]
    assert [(e["kind"], e.get("batch_norm_folded", False)) for e in rep["layers"]] == \
        [("conv2d", True), ("conv2d", False), ("matmul", False)]
    ref = m(x).detach().numpy()
    got = np.asarray(cm(x.numpy()))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_convs_knob_validated():
    from ember.errors import ConfigError

    with pytest.raises(ConfigError, match="Int8Dynamic.convs='yes'"):
        ember.Int8Dynamic(convs="yes")


@pytest.mark.slow
def test_avx2_target_convs_auto_fp32_and_on():
    """Without VNNI, convs="auto" leaves convs fp32 (reported); convs="on" quantizes them (int32 SIMD kernel),
    which runs here (AVX2 code on this CPU) and matches torch."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = m(x).detach().numpy()
    auto = ember.compile(m, (x,), target="x86-avx2", quantization=ember.Int8Dynamic())
    rep = auto.manifest["compression"]["quantization"]
    assert [e["kind"] for e in rep["layers"]] == ["matmul"] and len(rep["fp32_convs"]) == 2
    assert "VNNI" in rep["fp32_convs"][0]["reason"]
    on = ember.compile(m, (x,), target="x86-avx2", quantization=ember.Int8Dynamic(convs="on"))
    rep = on.manifest["compression"]["quantization"]
    assert [e["kind"] for e in rep["layers"]] == ["conv2d", "conv2d", "matmul"]
    got = np.asarray(on(x.numpy()))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


@pytest.mark.parametrize("target", [HOST, AVX_VNNI, AVX2], ids=["host", "avx-vnni", "avx2"])
def test_int8_conv_tensorized_to_vpdpbusd_where_vnni(target):
    lanes = kernels.int8_lanes(target)
    f = ck.int8_conv2d(16, 8, 8, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), lanes, True, target)
    asm = tvm.compile(_module(f), target=target).mod.inspect_source("asm")
    assert ("vpdpbusd" in asm) == (kernels.vnni_lanes(target) is not None)
