"""conv + BatchNorm folding: structural (no BN left, weights folded into the compile-time transform) and numeric
(folded model == original, through torch.export and through ONNX with BatchNormalization nodes kept)."""

import pytest
import torch
from conftest import assert_close
from models import CNN, randomize_bn, seeded
from tvm import relax

from ember.compiler.build import compile_model, import_model
from ember.compiler.pipeline import TRANSFORM_PARAMS, prepare
from ember.passes.fold_bn import FoldBatchNorm, count_batch_norms


class ConvBiasBN(torch.nn.Module):
    """conv with a bias + BN (the bias must be folded too), a grouped conv + BN, a BN with no affine params."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=True), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), torch.nn.BatchNorm2d(8)
        self.c3, self.b3 = torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4, affine=False)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        return self.b3(self.c3(y))


def _random_stats(model, seed=0):
    """Non-trivial running statistics (and affine params where the BN has them), so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _ops(func):
    names = []

    def _visit(e):
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            names.append(e.op.name)

    relax.analysis.post_order_visit(func.body, _visit)
    return names


@pytest.mark.parametrize("make", [lambda: randomize_bn(seeded(CNN)), lambda: _random_stats(seeded(ConvBiasBN))])
def test_torch_bn_folded_structurally(make):
    m = make()
    imported = import_model(m, (torch.randn(2, 3, 16, 16),))
    n = count_batch_norms(imported.mod)
    assert n > 0
    folded = FoldBatchNorm(imported.mod)
    assert count_batch_norms(folded) == 0
    prepared = prepare(imported.mod)
    main_ops = _ops(prepared["main"])
    # BN's arithmetic ran into the weight transform: per inference only conv + add (+ relu) remain
    assert "relax.rsqrt" not in main_ops and "relax.nn.batch_norm" not in main_ops
    # the scaled conv weights are computed once, at compile time (rsqrt of the statistics may already be folded)
    assert "relax.multiply" in _ops(prepared[TRANSFORM_PARAMS])
    assert main_ops.count("relax.multiply") == 0, "a BN scale is still applied to activations at run time"


# (the ResNet-style CNN is compiled and checked numerically by the ONNX test below)
@pytest.mark.parametrize("make", [lambda: _random_stats(seeded(ConvBiasBN))])
def test_folded_model_equals_original(make):
    m = make()
    x = torch.randn(1, 3, 12, 12)
    folded = compile_model(m, (x,))
    kernels = folded.manifest["kernels"]["ember"]["kernels"]
    # the folded shift is fused into the conv kernel (conv2d, or ember.passes.layout's packed NHWC conv)
    assert any(any("conv2d" in op for op in k["ops"]) and "add" in k["ops"] for k in kernels), kernels
    with torch.inference_mode():
        ref = m(x).numpy()
    assert_close(folded(x.numpy()), ref, rtol=1e-4, atol=1e-5)


def test_onnx_batchnorm_nodes_are_folded(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = randomize_bn(seeded(CNN))
    x = torch.randn(1, 3, 12, 12)
    path = str(tmp_path / "cnn.onnx")
    # no constant folding: the file keeps Conv -> BatchNormalization, as many exporters write it
    torch.onnx.export(m, (x,), path, dynamo=False, do_constant_folding=False, input_names=["x"])
    imported = import_model(path)
    assert count_batch_norms(imported.mod) == 8
    assert count_batch_norms(FoldBatchNorm(imported.mod)) == 0
    cm = compile_model(path)
    theirs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert_close(cm(x.numpy()), theirs, rtol=1e-4, atol=1e-5)


def test_bn_on_a_runtime_input_is_not_folded():
    """A BN whose statistics are runtime inputs cannot be folded at compile time: the pass must leave it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    w = relax.Var("w", relax.TensorType((4, 3, 3, 3), "float32"))
    stats = [relax.Var(n, relax.TensorType((4,), "float32")) for n in ("g", "b", "mu", "var")]
    with bb.function("main", [x, *stats, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w))
            z = bb.emit(relax.op.nn.batch_norm(y, *stats, axis=1, training=False))
            out = bb.emit_output(relax.TupleGetItem(z, 0))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 5)  # the statistics are inputs, only w is a weight
    assert count_batch_norms(FoldBatchNorm(mod)) == 1
    mod["main"] = mod["main"].with_attr("num_input", 1)  # now all are weights: folded
    assert count_batch_norms(FoldBatchNorm(mod)) == 0
