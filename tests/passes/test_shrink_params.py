"""Weights that repeat along an axis are stored once (ember.passes.shrink_params), with unchanged results."""

import numpy as np
import pytest
import torch

import ember
from ember.passes.shrink_params import repeated_axes


class TokenTypeLike(torch.nn.Module):
    """BERT's pattern: an embedding looked up with a zero-id buffer expanded to the input's batch and length."""

    def __init__(self, hidden=64, seq=32):
        super().__init__()
        self.emb = torch.nn.Embedding(2, hidden)
        self.register_buffer("type_ids", torch.zeros(1, seq, dtype=torch.int64))
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, _ = x.shape
        types = self.emb(self.type_ids[:, :s].expand(b, s))
        return self.proj(x + types)


def _weights(cm):
    cm(*[np.zeros([int(d) for d in spec.shape], spec.dtype) for spec in cm.inputs])  # moves params to the device
    return [tuple(w.shape) for w in cm._params]


def test_repeated_axes():
    a = np.broadcast_to(np.arange(6.0).reshape(1, 1, 6), (4, 3, 6)).copy()
    assert repeated_axes(a) == (0, 1)
    a[2, 1, 5] += 1e-6
    assert repeated_axes(a) == ()
    b = np.broadcast_to(np.arange(12.0).reshape(1, 3, 4), (5, 3, 4))
    assert repeated_axes(b) == (0,)
    assert repeated_axes(np.full((3, 4), np.nan)) == ()  # NaN != NaN: never claimed equal


def test_broadcast_constant_is_stored_once_and_results_match():
    torch.manual_seed(0)
    model = TokenTypeLike().eval()
    x = torch.randn(8, 32, 64)
    cm = ember.compile(model, (x,))
    shapes = _weights(cm)
    assert (1, 1, 64) in shapes and (8, 32, 64) not in shapes, shapes
    got = cm(x.numpy())
    got = got[0] if isinstance(got, (list, tuple)) else got
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


class MatmulConstant(torch.nn.Module):
    """A weight that is constant along an axis but feeds a matmul: must be left as it is."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(64, 96) * torch.arange(96.0))

    def forward(self, x):
        return x @ self.w


def test_weights_of_non_broadcasting_ops_are_kept():
    model = MatmulConstant().eval()
    x = torch.randn(4, 64)
    cm = ember.compile(model, (x,))
    assert all(int(np.prod(s)) >= 64 * 96 for s in _weights(cm) if len(s) >= 2)
    got = cm(x.numpy())
    got = got[0] if isinstance(got, (list, tuple)) else got
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-4)
