"""The packed N:M format (ember.passes.sparsity.pack): masks, pack/unpack round trips, bad input."""

import numpy as np
import pytest

from ember.errors import ConfigError
from ember.passes.sparsity import pack as P

CASES = [(1, 16, 7, 64), (1, 16, 5, 40), (2, 4, 9, 33), (1, 8, 16, 24), (3, 8, 4, 17), (1, 32, 6, 100),
         (4, 64, 3, 200), (1, 16, 1, 9), (15, 16, 2, 48)]


@pytest.mark.parametrize("n,m,rows,k", CASES)
def test_round_trip(n, m, rows, k):
    rng = np.random.default_rng(n * 1000 + m * 10 + k)
    w = rng.standard_normal((rows, k)).astype("float32")
    mask = P.nm_mask(w, n, m)
    sparse = w * mask
    # at most n per group, and exactly min(n, group size) kept (the weights are non-zero almost surely)
    groups = -(-k // m)
    counts = np.zeros((rows, groups), int)
    for g in range(groups):
        counts[:, g] = mask[:, g * m:(g + 1) * m].sum(1)
        assert (counts[:, g] == min(n, min(k, (g + 1) * m) - g * m)).all()
    # the kept ones are the largest in magnitude of their group
    g0 = np.abs(w[:, :min(m, k)])
    kept_min = np.where(mask[:, :min(m, k)], g0, np.inf).min(1)
    dropped_max = np.where(~mask[:, :min(m, k)], g0, -np.inf).max(1)
    assert (kept_min >= dropped_max).all()
    assert P.is_nm_sparse(sparse, n, m)
    p = P.pack(sparse, n, m)
    blocks = -(-rows // P.BLOCK)
    assert p.values.shape == (blocks, groups, n, P.BLOCK)
    assert p.indices.dtype == np.uint8
    assert p.indices.shape == (blocks, (-(-groups // 2) if m <= 16 else groups), n, P.BLOCK)
    np.testing.assert_array_equal(P.unpack(p), sparse)
    if rows % P.BLOCK == 0 and n / m <= 0.5:  # (row padding to a block costs a little on tiny layers)
        assert p.nbytes < sparse.nbytes


def test_groups_with_fewer_nonzeros_and_zero_rows():
    w = np.zeros((3, 32), "float32")
    w[0, 5] = 2.0          # one non-zero in a 2:4 group
    w[1, 31] = -1.0        # in the last group, last position
    p = P.pack(w, 2, 4)
    np.testing.assert_array_equal(P.unpack(p), w)
    # filler slots are zero-valued and point at a real column
    assert (P.unpack_indices(p.indices, p.groups, 4) < 4).all()


def test_pack_refuses_dense_weights_and_bad_nm():
    w = np.ones((4, 16), "float32")
    with pytest.raises(ConfigError, match="not 1:16 sparse"):
        P.pack(w, 1, 16)
    with pytest.raises(ConfigError, match="n=4"):
        P.nm_mask(w, 4, 4)
    with pytest.raises(ConfigError, match="2-D"):
        P.nm_mask(np.ones(8), 1, 4)
    assert P.nm_violations(w, 1, 16) == 4


def test_numpy_and_torch_masks_agree_on_counts():
    import torch

    from ember.passes.sparsity.prune import is_nm, nm_mask

    w = torch.randn(8, 3, 3, 3)  # conv weight: groups run along in*kh*kw = 27
    mask = nm_mask(w, 1, 16)
    assert mask.shape == w.shape
    flat = mask.reshape(8, -1).numpy()
    np.testing.assert_array_equal(flat, P.nm_mask(w.reshape(8, -1).numpy(), 1, 16))
    assert is_nm(w * mask, 1, 16) and not is_nm(w, 1, 16)
