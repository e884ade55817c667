"""The real all-MiniLM-L6-v2 on real sentences: both frontends, static and dynamic batch, export → load."""

import numpy as np
import pytest
import torch
from conftest import assert_close

import ember
from ember.models import minilm as m

pytestmark = pytest.mark.slow


def _ref(encoder, ids, mask):
    with torch.inference_mode():
        return encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def _cosines(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_minilm_torch_static_and_artifact(minilm, tmp_path):
    encoder, tok, sentences = minilm
    compiled, _ = m.compile_encoder(encoder=encoder)
    for s in sentences[:4]:
        ids, mask = m.tokenize(tok, [s])
        ours = compiled(ids, mask)
        ref = _ref(encoder, ids, mask)
        assert_close(ours, ref, rtol=1e-4, atol=1e-5, what=s)
        assert _cosines(ours, ref).min() > 0.99999
    art = compiled.export(tmp_path / "minilm")
    loaded = ember.load(art)
    ids, mask = m.tokenize(tok, sentences[:1])
    assert_close(loaded(ids, mask), compiled(ids, mask), rtol=0, atol=0)


def test_minilm_torch_dynamic_batch(minilm):
    encoder, tok, sentences = minilm
    compiled, _ = m.compile_encoder(encoder=encoder, dynamic_batch=True)
    for n in (1, 3, 8):
        ids, mask = m.tokenize(tok, sentences[:n])
        ours = compiled(ids, mask)
        assert ours.shape == (n, 384)
        assert_close(ours, _ref(encoder, ids, mask), what=f"batch {n}")


def test_minilm_onnx(minilm, tmp_path):
    import onnxruntime as ort

    encoder, tok, sentences = minilm
    ids, mask = m.tokenize(tok, sentences[:2])
    path = str(tmp_path / "minilm.onnx")
    torch.onnx.export(encoder, (torch.from_numpy(ids), torch.from_numpy(mask)), path,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}},
                      opset_version=17, dynamo=False)
    compiled = ember.compile(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 4):
        ids, mask = m.tokenize(tok, sentences[:n])
        ours = compiled(ids, mask)
        theirs = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        assert_close(ours, theirs, what=f"vs ORT batch {n}")
        assert_close(ours, _ref(encoder, ids, mask), what=f"vs torch batch {n}")
