"""The packed N:M format: per group of ``m`` consecutive weights along the reduction axis, ``n`` values + indices.

A linear weight ``W[N, K]`` (out features × in features; ``y = x @ W.T``) is cut along K into ``G = ceil(K / m)``
groups. Each (row, group) keeps exactly ``n`` slots: a value and its position inside the group (0 … m-1). A group
with fewer than ``n`` non-zeros fills the rest with value 0 at position 0 (harmless: it adds ``0 * x[...]``), and a
last, partial group (K not a multiple of m) only ever points at real columns, so the kernel never reads past x.

Layout (chosen for the kernels, not for humans): rows are cut into blocks of ``BLOCK`` = 16 (the last one padded
with zero rows), and each block's data is contiguous::

    values  [NB, G, n, 16]          the weight dtype        NB = ceil(N / 16)
    indices [NB, ceil(G/2), n, 16]  uint8, two 4-bit fields: group 2i in the low nibble, 2i+1 in the high (m ≤ 16)
    indices [NB, G, n, 16]          uint8, one position per byte (16 < m ≤ 256)

Within a block, a (group, slot) holds 16 consecutive rows: a CPU kernel loads them as one SIMD vector (values,
index bytes) and gathers x by index; on CUDA, 16 adjacent threads (rows) read 64 adjacent bytes. And one row
block's weights are one contiguous stream, which the hardware prefetcher follows (a row-innermost layout over all
N rows would put consecutive groups 16-32 KiB apart, a new page each, and was 3-10× slower at 1:8 and 2:4).

Bytes for 4096×4096 fp32 at 1:16: values 4 MiB + indices 0.5 MiB, against 64 MiB dense (14.2× smaller).

GPU layout (:func:`pack_gpu`, ``layout="groups"``): the same slots, but a row's ``V`` consecutive groups are
adjacent, ``V`` = 16 bytes / value size (8 for fp16, 4 for fp32)::

    values  [NB, GO, n, 16, V]            GO = ceil(G / V) (missing groups: value 0, position 0)
    indices [NB, GO, n, 16, V/2 or V]     uint8, 4-bit (group 2i of the V in the low nibble) or 8-bit

One GPU thread owns one row and reads a 16-byte vector of its values (V groups) and 4-8 index bytes with one
load each; the 16 threads of a row block read 256 contiguous bytes, and the gathers of those threads all fall in
the same ``m``-wide slice of x (one 32-byte sector for fp16 at m = 16). The CPU layout would make each GPU
thread load 2 bytes at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

BLOCK = 16  # rows per block of the packed layout: one AVX-512 vector of fp32, two AVX2 ones, half a CUDA warp


@dataclass(frozen=True)
class PackedNM:
    """A packed N:M weight (see the module doc for the layout); ``shape`` is the dense ``(N, K)``."""

    values: np.ndarray
    indices: np.ndarray
    n: int
    m: int
    shape: tuple[int, int]
    layout: str = "rows"  # "rows" (CPU: 16 rows per vector) or "groups" (GPU: V groups per vector)
    scales: np.ndarray | None = None  # int8 values only: fp32 scale per row [NB * 16] (padded rows: 1.0)

    @property
    def groups(self) -> int:
        return num_groups(self.shape[1], self.m)

    @property
    def index_bits(self) -> int:
        return index_bits(self.m)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes + (0 if self.scales is None else self.scales.nbytes))


def index_bits(m: int) -> int:
    """4 bits per index when a group position fits a nibble (m ≤ 16), else a byte."""
    return 4 if m <= 16 else 8


def num_blocks(rows: int) -> int:
    return -(-rows // BLOCK)


def num_groups(k: int, m: int) -> int:
    return -(-k // m)


def index_rows(groups: int, m: int) -> int:
    """Leading dimension of the indices array: two groups share a byte when indices are 4-bit."""
    return -(-groups // 2) if index_bits(m) == 4 else groups


def _check_nm(n: int, m: int):
    if not (isinstance(m, (int, np.integer)) and 2 <= m <= 256):
        raise ConfigError(f"m={m!r}: use 2 ≤ m ≤ 256 (e.g. 4, 8, 16)")
    if not (isinstance(n, (int, np.integer)) and 1 <= n < m):
        raise ConfigError(f"n={n!r}: use 1 ≤ n < m (= {m})")


def _grouped(w: np.ndarray, m: int) -> np.ndarray:
    """``[N, K]`` → ``[N, G, m]``, the partial last group padded with zeros (never selected over a real weight
    of larger magnitude, and only chosen as a filler slot pointing at position 0)."""
    rows, k = w.shape
    g = num_groups(k, m)
    padded = np.zeros((rows, g * m), dtype=w.dtype)
    padded[:, :k] = w
    return padded.reshape(rows, g, m)


def nm_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean mask keeping the ``n`` largest-magnitude weights of every group of ``m`` along the last axis.

    ``w`` is 2-D ``[N, K]`` (a conv weight is flattened to ``[O, I*kh*kw]`` by the caller). Ties are broken by
    position (stable), so the mask is deterministic.
    """
    _check_nm(n, m)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ConfigError(f"nm_mask expects a 2-D weight [out, in], got shape {w.shape}")
    rows, k = w.shape
    grouped = np.abs(_grouped(w, m)).astype(np.float64)
    # Padding columns must lose against every real column, even a zero one.
    g = grouped.shape[1]
    pad = np.arange(g * m).reshape(g, m) >= k
    grouped[:, pad] = -1.0
    order = np.argsort(-grouped, axis=-1, kind="stable")[..., :n]
    keep = np.zeros_like(grouped, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep.reshape(rows, g * m)[:, :k]


def is_nm_sparse(w: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` along the last axis holds at most ``n`` non-zeros."""
    return bool(nm_violations(w, n, m) == 0)


def nm_violations(w: np.ndarray, n: int, m: int) -> int:
    """How many (row, group) pairs hold more than ``n`` non-zeros."""
    w = np.asarray(w).reshape(np.asarray(w).shape[0], -1)
    nz = (_grouped(w, m) != 0).sum(axis=-1)
    return int((nz > n).sum())


def _slots(w: np.ndarray, n: int, m: int):
    """Values and positions ``[N, G, n]`` of every (row, group) slot, after the checks ``pack`` promises."""
    _check_nm(n, m)
    w = np.ascontiguousarray(w)
    if w.ndim != 2:
        raise ConfigError(f"pack expects a 2-D weight [out, in], got shape {w.shape}")
    bad = nm_violations(w, n, m)
    if bad:
        raise ConfigError(f"pack: weight of shape {w.shape} is not {n}:{m} sparse ({bad} groups hold more than "
                          f"{n} non-zeros); prune it first (ember.sparsity.nm_mask / prune_nm)")
    grouped = _grouped(w, m)  # [N, G, m]
    # Non-zeros first (in position order), then zero slots: the first n positions of this order are the slots.
    # Zero fillers point at the group's first column, which always exists.
    key = np.where(grouped != 0, np.arange(m), m + np.arange(m))
    order = np.argsort(key, axis=-1, kind="stable")[..., :n]          # [N, G, n]
    vals = np.take_along_axis(grouped, order, axis=-1)                 # [N, G, n]
    pos = np.where(vals != 0, order, 0).astype(np.uint8)
    return vals, pos


def _pad_rows(vals, pos):
    rows = vals.shape[0]
    pad = num_blocks(rows) * BLOCK - rows
    if pad:  # zero rows: their values are 0 and their positions 0, so they add nothing and read column g*m
        vals = np.concatenate([vals, np.zeros((pad,) + vals.shape[1:], vals.dtype)])
        pos = np.concatenate([pos, np.zeros((pad,) + pos.shape[1:], np.uint8)])
    return vals, pos


def pack(w: np.ndarray, n: int, m: int) -> PackedNM:
    """Pack an N:M-sparse weight ``[N, K]`` (at most ``n`` non-zeros per group of ``m``; check with
    :func:`is_nm_sparse`, or prune first with :func:`nm_mask`). Raises if a group holds more than ``n``."""
    w = np.ascontiguousarray(w)
    vals, pos = _slots(w, n, m)
    rows, k = w.shape
    g = vals.shape[1]
    nb = num_blocks(rows)
    vals, pos = _pad_rows(vals, pos)
    # [Np, G, n] -> [NB, G, n, BLOCK]
    values = np.ascontiguousarray(vals.reshape(nb, BLOCK, g, n).transpose(0, 2, 3, 1))
    pos = pos.reshape(nb, BLOCK, g, n).transpose(0, 2, 3, 1)
    if index_bits(m) == 4:
        if g % 2:
            pos = np.concatenate([pos, np.zeros((nb, 1) + pos.shape[2:], np.uint8)], axis=1)
        indices = (pos[:, 0::2] | (pos[:, 1::2] << 4)).astype(np.uint8)
    else:
        indices = pos.astype(np.uint8)
    return PackedNM(values, np.ascontiguousarray(indices), int(n), int(m), (rows, k))


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row (per output channel): ``w ≈ q * scale[:, None]``, q in [-127, 127].

    The scale is max|w_row| / 127 over the row's kept weights (zeros do not widen it); an all-zero row gets 1.0.
    A kept weight that rounds to 0 becomes a zero slot (harmless: it multiplies x by 0).
    """
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pack_int8(w: np.ndarray, n: int, m: int) -> PackedNM:
    """:func:`pack` of the int8 codes of ``w`` (:func:`quantize_rows_int8`), with the row scales: 1 byte per kept
    weight + its 4-bit index, 1.5 bytes against 4.5 for fp32 values (3x fewer bytes at 1:16)."""
    q, scale = quantize_rows_int8(w)
    p = pack(q, n, m)
    padded = np.ones(num_blocks(q.shape[0]) * BLOCK, np.float32)
    padded[:q.shape[0]] = scale
    return PackedNM(p.values, p.indices, p.n, p.m, p.shape, p.layout, padded)


def dequantized(p: PackedNM) -> np.ndarray:
    """The fp32 dense weight an int8-packed one stands for (``unpack`` × row scales); float packs: ``unpack``."""
    dense = unpack(p)
    if p.scales is None:
        return dense
    return dense.astype(np.float32) * p.scales[:dense.shape[0], None]


def gpu_vector(dtype) -> int:
    """Groups per GPU vector: as many values as fill 16 bytes (8 fp16, 4 fp32)."""
    return max(2, 16 // np.dtype(dtype).itemsize)


def pack_gpu(w: np.ndarray, n: int, m: int) -> PackedNM:
    """Pack for the GPU kernel (``layout="groups"``, see the module doc); same checks as :func:`pack`."""
    w = np.ascontiguousarray(w)
    vals, pos = _slots(w, n, m)
    rows, k = w.shape
    g = vals.shape[1]
    v = gpu_vector(w.dtype)
    go = -(-g // v)
    if go * v > g:  # missing groups of the last vector: value 0, position 0 (the kernel never reads them)
        vals = np.concatenate([vals, np.zeros((rows, go * v - g, n), vals.dtype)], axis=1)
        pos = np.concatenate([pos, np.zeros((rows, go * v - g, n), np.uint8)], axis=1)
    vals, pos = _pad_rows(vals, pos)
    nb = num_blocks(rows)
    # [Np, GO*V, n] -> [NB, 16, GO, V, n] -> [NB, GO, n, 16, V]
    values = np.ascontiguousarray(vals.reshape(nb, BLOCK, go, v, n).transpose(0, 2, 4, 1, 3))
    pos = pos.reshape(nb, BLOCK, go, v, n).transpose(0, 2, 4, 1, 3)
    if index_bits(m) == 4:
        pos = pos[..., 0::2] | (pos[..., 1::2] << 4)
    return PackedNM(values, np.ascontiguousarray(pos, dtype=np.uint8), int(n), int(m), (rows, k), "groups")


def unpack_indices(indices: np.ndarray, groups: int, m: int) -> np.ndarray:
    """Positions ``[NB, G, n, BLOCK]`` (uint8) from the stored indices."""
    if index_bits(m) == 4:
        both = np.stack([indices & 0x0F, indices >> 4], axis=2)  # [NB, G2, 2, n, BLOCK]
        return both.reshape((indices.shape[0], -1) + indices.shape[2:])[:, :groups]
    return indices


def _as_rows_layout(p: PackedNM):
    """values ``[NB, G, n, 16]`` and positions ``[NB, G, n, 16]`` of either layout."""
    if p.layout == "rows":
        return p.values, unpack_indices(p.indices, p.values.shape[1], p.m)
    nb, go, n, _, v = p.values.shape
    pos = p.indices
    if index_bits(p.m) == 4:
        pos = np.stack([pos & 0x0F, pos >> 4], axis=-1).reshape(pos.shape[:-1] + (v,))
    g = p.groups
    def rows_major(a):  # [NB, GO, n, 16, V] -> [NB, GO*V, n, 16] -> first G groups
        return a.transpose(0, 1, 4, 2, 3).reshape(nb, go * v, n, BLOCK)[:, :g]
    return rows_major(p.values), rows_major(pos)


def unpack(p: PackedNM) -> np.ndarray:
    """The dense ``[N, K]`` weight back from its packed form (zeros where nothing was kept)."""
    rows, k = p.shape
    values, pos = _as_rows_layout(p)
    nb, g, n, _ = values.shape
    pos = pos.astype(np.int64)                                          # [NB, G, n, B]
    vals = values.transpose(0, 3, 1, 2).reshape(nb * BLOCK, g, n)       # [Np, G, n]
    pos = pos.transpose(0, 3, 1, 2).reshape(nb * BLOCK, g, n)
    dense = np.zeros((nb * BLOCK, g, p.m), dtype=values.dtype)
    r = np.arange(nb * BLOCK)[:, None, None]
    gi = np.arange(g)[None, :, None]
    # Filler slots (value 0 at position 0) may share a position with a real weight: add, never overwrite.
    np.add.at(dense, (np.broadcast_to(r, pos.shape), np.broadcast_to(gi, pos.shape), pos), vals)
    return dense.reshape(nb * BLOCK, g * p.m)[:rows, :k]
