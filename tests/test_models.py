"""Numerics of whole models: torch and ONNX frontends, static and dynamic batch, against PyTorch and ONNX Runtime,
and export → load → same outputs."""

import numpy as np
import pytest
import torch
from conftest import assert_close
from models import CNN, MLP, TinyTransformer, randomize_bn, seeded

import ember


def _inputs(name, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return (torch.randn(batch, 32, generator=g),)
    if name == "cnn":
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    ids = torch.randint(0, 100, (batch, 16), generator=g)
    mask = torch.ones(batch, 16, dtype=torch.int64)
    mask[0, 11:] = 0  # padding in the first sequence, so the mask path matters
    return ids, mask


def _model(name):
    if name == "mlp":
        return seeded(MLP)
    if name == "cnn":
        return randomize_bn(seeded(CNN))
    return seeded(TinyTransformer)


def _onnx_path(model, args, tmp_path, dynamic):
    names = ["x"] if len(args) == 1 else ["ids", "mask"]
    path = str(tmp_path / "model.onnx")
    axes = {n: {0: "batch"} for n in names} if dynamic else None
    torch.onnx.export(model, args, path, input_names=names, output_names=["y"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return path


def _ort(path, args):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_frontend(name, dynamic, tmp_path):
    model = _model(name)
    args = _inputs(name, 2)
    compiled = ember.compile(model, args, dynamic_batch=dynamic)
    with torch.no_grad():
        ref = model(*args).numpy()
    out = compiled(*[a.numpy() for a in args])
    assert isinstance(out, np.ndarray)
    assert_close(out, ref, what=f"{name} torch-frontend")
    if dynamic:
        assert compiled.inputs[0].shape[0] == "batch"
        for b in (1, 5):
            args_b = _inputs(name, b, seed=b)
            with torch.no_grad():
                assert_close(compiled(*[a.numpy() for a in args_b]), model(*args_b).numpy(), what=f"batch {b}")
    # torch in → torch out, through DLPack
    out_t = compiled(*args)
    assert isinstance(out_t, torch.Tensor)
    assert_close(out_t.numpy(), ref)
    # export → load → same outputs
    art = compiled.export(tmp_path / "art")
    loaded = ember.load(art)
    assert_close(loaded(*[a.numpy() for a in args]), out, rtol=0, atol=0, what="loaded artifact")


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_onnx_frontend(name, dynamic, tmp_path):
    model = _model(name)
    args = _inputs(name, 2)
    path = _onnx_path(model, args, tmp_path, dynamic)
    compiled = ember.compile(path)
    assert [s.name for s in compiled.outputs] == ["y"]
    np_args = [a.numpy() for a in args]
    ours = compiled(*np_args)
    assert_close(ours, _ort(path, args), what=f"{name} vs ONNX Runtime")
    with torch.no_grad():
        assert_close(ours, model(*args).numpy(), what=f"{name} vs torch")
    if dynamic:
        args3 = _inputs(name, 3, seed=3)
        assert_close(compiled(*[a.numpy() for a in args3]), _ort(path, args3), what="batch 3 vs ORT")
    art = compiled.export(tmp_path / "art.tar")
    assert_close(ember.load(art)(*np_args), ours, rtol=0, atol=0, what="loaded .tar artifact")


def test_inputs_by_name_and_torch_zero_copy():
    model = seeded(TinyTransformer)
    ids, mask = _inputs("transformer", 2)
    compiled = ember.compile(model, (ids, mask))
    assert [s.name for s in compiled.inputs] == ["ids", "mask"]
    a = compiled(ids.numpy(), mask=mask.numpy())
    b = compiled(mask=mask.numpy(), ids=ids.numpy())
    assert_close(a, b, rtol=0, atol=0)
    # DLPack: an ember output handed to torch shares memory (no copy).
    out = compiled(ids, mask)
    assert out.data_ptr() == torch.from_dlpack(out).data_ptr()
