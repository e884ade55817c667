"""End-to-end quantized compiles against fp32 PyTorch, the graph rewrite, params size, reports and bad configs."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import ember
from ember.config import parse_quantization
from ember.errors import ConfigError
from models import MLP, TinyTransformer, seeded


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = seeded(MLP, d_in=64, hidden=96, d_out=10)
    x = torch.randn(6, 64)
    return model, x, model(x).detach().numpy()


@pytest.mark.parametrize("cfg,tol", [
    (ember.WeightOnly(bits=4, group_size=16), 0.15),
    (ember.WeightOnly(bits=4, group_size=32, symmetric=False), 0.12),
    (ember.WeightOnly(bits=8, group_size=-1), 0.02),
    (ember.Int8Dynamic(), 0.03),
    (ember.Int8Dynamic(granularity="tensor"), 0.04),
])
def test_mlp_quantized_close_to_torch(mlp, cfg, tol):
    model, x, ref = mlp
    cm = ember.compile(model, (x,), quantization=cfg)
    got = cm(x.numpy())
    # log-probabilities: compare the probabilities
    assert np.abs(np.exp(got) - np.exp(ref)).max() < tol
    rep = cm.manifest["compression"]["quantization"]
    assert rep["scheme"]["type"] == type(cfg).__name__
    assert len(rep["layers"]) == 3 and all(e["kind"] == "matmul" for e in rep["layers"])
    assert rep["end_to_end"]["on"] == "example inputs" and rep["end_to_end"]["mean"] > 0.99
    # the report's number is the compiled model's: recompute it
    assert rep["end_to_end"]["mean"] == pytest.approx(
        np.mean([_cos(g, r) for g, r in zip(got, ref)]), abs=1e-5)


def test_weight_only_rewrite_removes_fp32_weights(mlp):
    """main no longer takes the fp32 linear weights: only packed codes, fp16 scales (and fused biases)."""
    from ember.compiler.build import import_model
    from ember.passes.quantize import apply_quantization

    model, x, _ = mlp
    imported = import_model(model, (x,))
    fp32 = sum(p.nbytes for p in imported.params)
    imported, report = apply_quantization(imported, ember.WeightOnly(4, 32), None, example_inputs=(x,))
    dtypes = {str(p.dtype) for p in imported.params}
    assert dtypes == {"uint8", "float16", "float32"}
    assert all(p.ndim == 1 for p in imported.params if p.dtype == np.float32)  # biases only
    text = imported.mod["main"].script()
    assert "R.matmul" not in text and "permute_dims" not in text and "call_tir" in text
    assert report["param_bytes"]["fp32"] == fp32


@pytest.mark.slow
def test_int4_params_on_disk_under_a_sixth(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    x = torch.randn(4, 256)
    cm = ember.compile(model, (x,), quantization=ember.WeightOnly(bits=4, group_size=32))
    path = cm.export(str(tmp_path / "q"))
    import os

    on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith("params"))
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert on_disk <= fp32 / 6, (on_disk, fp32)
    assert _cos(cm(x.numpy()), model(x).detach().numpy()) > 0.99
    loaded = ember.load(path)
    np.testing.assert_allclose(loaded(x.numpy()), cm(x.numpy()), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_static_int8_mlp_and_calibration_determinism(mlp):
    model, x, ref = mlp
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(6, 64, generator=g),) for _ in range(4)]
    reports = []
    for method in ("minmax", "percentile", "mse", "entropy"):
        cm = ember.compile(model, (x,), quantization=ember.Int8Static(calibration=calib, method=method))
        assert np.abs(np.exp(cm(x.numpy())) - np.exp(ref)).max() < 0.05, method
        rep = cm.manifest["compression"]["quantization"]
        assert rep["end_to_end"]["on"] == "calibration data" and rep["end_to_end"]["mean"] > 0.99
        reports.append([e["activation_clip"] for e in rep["layers"]])
    again = ember.compile(model, (x,), quantization=ember.Int8Static(calibration=list(calib), method="minmax"))
    assert [e["activation_clip"] for e in again.manifest["compression"]["quantization"]["layers"]] == reports[0]


def test_dynamic_batch_quantized(mlp):
    model, x, _ = mlp
    cm = ember.compile(model, (x,), dynamic_batch=True, quantization=ember.Int8Dynamic())
    for n in (1, 3, 17):
        xb = torch.randn(n, 64)
        assert np.abs(np.exp(cm(xb.numpy())) - np.exp(model(xb).detach().numpy())).max() < 0.03


@pytest.mark.slow
def test_tiny_transformer_quantized():
    model = seeded(TinyTransformer)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    ref = model(ids, mask).detach().numpy()
    for cfg, min_cos in ((ember.Int8Dynamic(), 0.999), (ember.WeightOnly(4, 32, symmetric=False), 0.98)):
        cm = ember.compile(model, (ids, mask), quantization=cfg)
        got = cm(ids.numpy(), mask.numpy())
        assert min(_cos(g, r) for g, r in zip(got, ref)) > min_cos, cfg
        kinds = {e["kind"] for e in cm.manifest["compression"]["quantization"]["layers"]}
        assert kinds == ({"matmul", "embedding"} if isinstance(cfg, ember.WeightOnly) else {"matmul"})


@pytest.mark.slow
def test_mixed_respects_budget(mlp):
    model, x, ref = mlp
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randn(6, 64, generator=g),) for _ in range(3)]
    cm = ember.compile(model, (x,), quantization=ember.Mixed(budget=1e-4, calibration=calib, group_size=16))
    rep = cm.manifest["compression"]["quantization"]
    mixed = rep["mixed"]
    assert mixed["int4_layers"] + mixed["int8_layers"] == 3
    assert set(mixed["sensitivity"]) == {e["layer"] for e in rep["layers"]}
    assert mixed["simulated_drop"] <= 1e-4 or mixed["int4_layers"] == 0
    assert 1 - rep["end_to_end"]["mean"] <= 1e-4 + 2e-5  # measured on the compiled model
    assert {e["bits"] for e in rep["layers"]} <= {4, 8}
    loose = ember.compile(model, (x,), quantization=ember.Mixed(budget=0.5, calibration=calib, group_size=16))
    assert loose.manifest["compression"]["quantization"]["mixed"]["int4_layers"] == 3


@pytest.mark.slow
def test_dynamic_quantizer_one_liner(mlp):
    model, x, ref = mlp
    q = ember.quantization.DynamicQuantizer(model, bits=4, example_inputs=(x,)).optimize()
    assert np.abs(np.exp(q(x.numpy())) - np.exp(ref)).max() < 0.12
    q8 = ember.quantization.DynamicQuantizer(model, bits=8, example_inputs=(x,)).optimize()
    assert q8.manifest["compression"]["quantization"]["scheme"]["type"] == "Int8Dynamic"
    with pytest.raises(ConfigError, match="bits"):
        ember.quantization.DynamicQuantizer(model, bits=2)


def test_bad_configs_name_field_and_layer(mlp):
    model, x, _ = mlp
    with pytest.raises(ConfigError, match=r"WeightOnly\.bits=3"):
        ember.WeightOnly(bits=3)
    with pytest.raises(ConfigError, match=r"group_size=24 .*K=64 of layer 'p_fc1_weight'"):
        ember.compile(model, (x,), quantization=ember.WeightOnly(bits=4, group_size=24))
    with pytest.raises(ConfigError, match="calibration"):
        ember.Int8Static()
    with pytest.raises(ConfigError, match="method"):
        ember.Int8Static(calibration=[(x,)], method="median")
    with pytest.raises(ConfigError, match="calibration batch 0"):
        ember.compile(model, (x,), quantization=ember.Int8Static(calibration=[(x, x)]))
    with pytest.raises(ConfigError, match="--quantize 'int3-g32'"):
        parse_quantization("int3-g32")
    assert parse_quantization("int4-g32-asym") == ember.WeightOnly(4, 32, symmetric=False)
    assert parse_quantization("int8") == ember.Int8Dynamic()


@pytest.mark.slow
def test_cli_quantize_onnx(tmp_path):
    """`ember compile model.onnx --quantize int4-g32-asym` quantizes ONNX MatMul/Gemm weights and prints the report."""
    import json
    import os
    import subprocess
    import sys

    model = seeded(MLP, d_in=64, hidden=96, d_out=10)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (torch.randn(2, 64),), str(path), input_names=["features"], output_names=["logp"],
                      dynamic_axes={"features": {0: "batch"}}, opset_version=17, dynamo=False)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "ember.cli", "compile", str(path), "-o", str(tmp_path / "q"),
                          "--quantize", "int4-g32-asym"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "end to end: cosine vs fp32" in res.stdout and "synthetic random inputs" in res.stdout
    manifest = json.load(open(tmp_path / "q" / "manifest.json"))
    rep = manifest["compression"]["quantization"]
    assert rep["scheme"] == {"type": "WeightOnly", "bits": 4, "group_size": 32, "symmetric": False}
    assert len(rep["layers"]) == 3 and rep["end_to_end"]["mean"] > 0.99
    x = torch.randn(5, 64)
    got = ember.load(str(tmp_path / "q"))(x.numpy())
    assert np.abs(np.exp(got) - np.exp(model(x).detach().numpy())).max() < 0.1
    bad = subprocess.run([sys.executable, "-m", "ember.cli", "compile", str(path), "-o", str(tmp_path / "b"),
                          "--quantize", "int3-g32"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "int3-g32" in bad.stderr


def test_unsupported_target_refused_clearly(mlp):
    # GPU targets (cuda, rocm, metal) have quantized kernels now (tests/passes/test_quantize_gpu.py); others not
    model, x, _ = mlp
    with pytest.raises(ConfigError, match="CPU"):
        ember.compile(model, (x,), target={"kind": "opencl"}, quantization=ember.Int8Dynamic())


@pytest.mark.slow
def test_int8_dynamic_fuses_quantizers_into_producers():
    """Dynamic INT8 on a transformer: each layer norm that feeds int8 GEMMs writes their codes itself
    (layernorm_quantize) and q/k/v share one quantization; only the attention output and the GELU output keep a
    standalone quantizer (their producers are not ember's). The optional GELU epilogue (off by default: no
    faster) is found on both FFNs."""
    from tvm import relax

    from ember.compiler.build import import_model
    from ember.passes.quantize import apply_quantization
    from ember.passes.quantize.graph import find_sites

    model = seeded(TinyTransformer)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    imported = import_model(model, (ids, mask))
    with_gelu = find_sites(imported.mod["main"], imported.param_names, False, activations=True)
    assert sum(s.activation == "gelu" for s in with_gelu) == 2
    imported, _ = apply_quantization(imported, ember.Int8Dynamic(), None, example_inputs=(ids, mask))
    calls = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            calls.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(imported.mod["main"].body, visit)
    count = {n: sum(c.startswith(n) for c in calls) for n in ("ember_layernorm_quant", "ember_quant_act",
                                                               "ember_int8_matmul")}
    assert count == {"ember_layernorm_quant": 4, "ember_quant_act": 4, "ember_int8_matmul": 8}, calls


def test_int8_dynamic_post_norm_residual_fused():
    """BERT-style post-norm block: layer_norm(linear(x) + x) feeding another linear — the residual add, the norm
    and the next layer's quantizer run as one kernel; the result still matches torch."""
    class PostNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x) + x))

    model = seeded(PostNorm)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 7, 32)
    cm = ember.compile(model, (x,), quantization=ember.Int8Dynamic())
    got, ref = cm(x.numpy()), model(x).detach().numpy()
    assert _cos(got, ref) > 0.999 and np.abs(got - ref).max() < 0.05
    assert len(cm.manifest["compression"]["quantization"]["layers"]) == 2
    names = [k["name"] for k in cm.manifest["kernels"]["ember"]["kernels"]]
    # 4 launches: quantize x, fc1, add + norm + quantize (residual flag 1), fc2
    assert len(names) == 4 and any(n.startswith("ember_layernorm_quant_32_1_") for n in names), names
