import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


def assert_close(actual, expected, rtol=1e-4, atol=1e-5, what="output"):
    """fp32 comparison; tolerances are relative to the reference's scale so large activations are fair."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    assert err <= atol * scale + rtol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="session")
def minilm():
    """(torch encoder, tokenizer, real sentences) — the real all-MiniLM-L6-v2."""
    from ember.models import minilm as m
    from ember.models.corpus import stdlib_sentences

    return m.load_encoder(), m.load_tokenizer(), stdlib_sentences(16)
