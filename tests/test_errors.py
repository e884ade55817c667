"""Bad input gets a clear EmberError naming the file/op/node/input — never a raw TVM traceback or a crash."""

import json
import os

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from models import MLP, seeded
from onnx import TensorProto, helper

import ember
from ember.errors import (ArtifactError, ConfigError, InputError, ModelLoadError, TargetError,
                          UnsupportedOpError)


@pytest.fixture(scope="module")
def mlp_compiled():
    model = seeded(MLP)
    return ember.compile(model, (torch.randn(2, 32),), dynamic_batch=True)


def test_missing_file():
    with pytest.raises(ModelLoadError, match="/no/such/model.onnx: no such file"):
        ember.compile("/no/such/model.onnx")
    with pytest.raises(ModelLoadError, match="no such file"):
        ember.compile("/no/such/model.pt2")


def test_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are my notes, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match=r"notes\.onnx: not an ONNX model"):
        ember.compile(str(bad))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        ember.compile(str(empty))
    other = tmp_path / "model.bin"
    other.write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="unknown model format"):
        ember.compile(str(other))


def _onnx_with(op_type, node_name, tmp_path, domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first_relu"),
             helper.make_node(op_type, ["r"], ["y"], name=node_name, domain=domain),
             helper.make_node("Neg", ["y"], ["z"], name="neg")]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [z], value_info=[y]), opset_imports=opsets)
    path = tmp_path / f"{op_type}.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_unsupported_onnx_op_names_op_and_node(tmp_path):
    path = _onnx_with("Det", "determinant_of_features", tmp_path)
    with pytest.raises(UnsupportedOpError) as e:
        ember.compile(path)
    msg = str(e.value)
    assert "Det" in msg and "determinant_of_features" in msg and path in msg
    assert e.value.ops == ("Det",)
    custom = _onnx_with("MyFancyOp", "fancy1", tmp_path, domain="com.example")
    with pytest.raises(UnsupportedOpError, match=r"com\.example\.MyFancyOp.*fancy1"):
        ember.compile(custom)


def test_unsupported_torch_op_names_op_and_node():
    class Det(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.det(x) * 2

    with pytest.raises(UnsupportedOpError) as e:
        ember.compile(Det(), (torch.randn(2, 3, 3),))
    assert "linalg_det" in str(e.value) and "node '" in str(e.value)


def test_wrong_inputs_at_run_time(mlp_compiled):
    m = mlp_compiled
    x = np.random.rand(4, 32).astype("float32")
    with pytest.raises(InputError, match=r"takes 1 input\(s\) \(x: float32\[batch, 32\]\), got 2"):
        m(x, x)
    with pytest.raises(InputError, match="takes 1 input"):
        m()
    with pytest.raises(InputError, match=r"'x' dimension 1 must be 32 .* got 31"):
        m(np.zeros((4, 31), "float32"))
    with pytest.raises(InputError, match=r"'x' must have 2 dimensions"):
        m(np.zeros((32,), "float32"))
    with pytest.raises(InputError, match=r"'x' must be float32, got float64"):
        m(np.zeros((4, 32)))
    with pytest.raises(InputError, match=r"'x' must be float32, got int64"):
        m(torch.zeros((4, 32), dtype=torch.int64))
    with pytest.raises(InputError, match=r"unknown input name\(s\) \['y'\]"):
        m(y=x)
    with pytest.raises(InputError, match="must be at least 1"):
        m(np.zeros((0, 32), "float32"))
    with pytest.raises(InputError, match="numpy array or torch tensor"):
        m("not an array")
    assert m(x).shape == (4, 10)  # and the model still works after all that


def test_tampered_artifact(mlp_compiled, tmp_path):
    art = mlp_compiled.export(tmp_path / "art")
    params = os.path.join(art, "params.bin")
    data = bytearray(open(params, "rb").read())
    data[-5] ^= 0xFF
    open(params, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match=r"params\.bin does not match the sha256"):
        ember.load(art)
    os.remove(os.path.join(art, "model.so"))
    with pytest.raises(ArtifactError, match=r"model\.so is missing"):
        ember.load(art)
    os.remove(os.path.join(art, "manifest.json"))
    with pytest.raises(ArtifactError, match="not an ember artifact"):
        ember.load(art)
    with pytest.raises(ArtifactError, match="no such artifact"):
        ember.load(tmp_path / "nothing-here")


def test_artifact_for_another_target(tmp_path):
    """Code for AVX-512 must be refused on a CPU without it, before it can die with SIGILL."""
    from ember.runtime.load import host_cpu_flags, load

    model = seeded(MLP)
    compiled = ember.compile(model, (torch.randn(2, 32),), target="x86-avx512")
    art = compiled.export(tmp_path / "avx512")
    needs = json.load(open(os.path.join(art, "manifest.json")))["target"]["cpu_flags"]
    assert "avx512f" in needs
    flags = host_cpu_flags() or set()
    with pytest.raises(ArtifactError, match=r"avx512f.*Illegal instruction.*--target host"):
        load(art, cpu_flags=flags - {"avx512f"})
    # And an artifact for the CPU asked to run on a GPU is refused by device kind.
    with pytest.raises(ArtifactError, match=r"runs on 'cpu', but device='cuda'"):
        ember.load(art, device="cuda")


def test_export_never_overwrites_silently(mlp_compiled, tmp_path):
    art = mlp_compiled.export(tmp_path / "art")
    with pytest.raises(ArtifactError, match="already exists"):
        mlp_compiled.export(art)
    mlp_compiled.export(art, overwrite=True)
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(ArtifactError, match="not an ember artifact"):
        mlp_compiled.export(mine, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_external_data_outside_model_folder(tmp_path):
    w = onnx.numpy_helper.from_array(np.array([1.0, 2.0, 3.0], "float32"), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    inside = tmp_path / "ok"
    inside.mkdir()
    onnx.save(model, str(inside / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (inside / "weights.bin").exists()
    out = ember.compile(str(inside / "m.onnx"))(np.ones(3, "float32"))
    np.testing.assert_allclose(out, [2, 3, 4])
    # Point the tensor at a file outside the model's folder: refused, naming the initializer.
    m2 = onnx.load(str(inside / "m.onnx"), load_external_data=False)
    for e in m2.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 12)
    (inside / "evil.onnx").write_bytes(m2.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"initializer 'w' .*outside the model's folder"):
        ember.compile(str(inside / "evil.onnx"))
    os.remove(inside / "weights.bin")
    with pytest.raises(ModelLoadError, match=r"needs external data file 'weights.bin', which is missing"):
        ember.compile(str(inside / "m.onnx"))


def test_bad_configuration():
    with pytest.raises(TargetError, match="unknown target 'tpu-v9'; choose one of: host"):
        ember.compile(seeded(MLP), (torch.randn(2, 32),), target="tpu-v9")
    with pytest.raises(ConfigError, match="quantization"):
        ember.compile(seeded(MLP), (torch.randn(2, 32),), quantization="int8")
    with pytest.raises(ModelLoadError, match="needs example_inputs"):
        ember.compile(seeded(MLP))
    with pytest.raises(ModelLoadError, match="cannot compile an object of type int"):
        ember.compile(42)
