"""Quantization arithmetic in numpy: the reference every kernel is tested against, and the compile-time packing.

Conventions (the kernels in :mod:`.kernels` read exactly these layouts):

* Weights are quantized to unsigned codes ``q`` in ``[0, 2**bits - 1]`` with ``w ≈ (q - zero) * scale``.
  Symmetric: ``zero = 2**(bits-1)`` (a constant, not stored), ``scale = absmax / (2**(bits-1) - 1)``.
  Asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)`` stored as uint8.
* Weight-only matmul weights are stored ``[K, N]`` (reduction axis first) so a kernel decodes a panel of
  consecutive output columns with contiguous reads; groups run along K: ``scales[K // group, N]`` (float16:
  half the bytes, and its 2^-11 relative rounding is far below a 4-bit step). INT4 packs two neighbouring
  columns per byte, column ``2j`` in the low nibble.
* Embedding tables (``take``) stay ``[V, D]`` with groups along D and two neighbouring D entries per byte.
* INT8 (W8A8) weights are symmetric int8 per output channel, laid out for the x86 VNNI dot product
  ``vpdpbusd`` (u8 x s8 → s32, 4 consecutive k per 32-bit lane): ``[ceil(N/L), ceil(K/4), L, 4]`` with
  L = 16 (or 8) output channels per vector, zero-padded. Activations are quantized to ``q + 128`` (uint8), so
  the kernel subtracts ``128 * sum_k w[k, n]`` (precomputed, ``wsum``) from the int32 accumulator.
"""

from __future__ import annotations

import numpy as np


def _groups(k: int, group: int) -> int:
    return 1 if group == -1 else k // group


_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _codes(wg, lo, hi, bits, symmetric):
    """Codes, scale, zero for groups ``wg[..., g]`` with range [lo, hi] (symmetric: hi = absmax, lo unused)."""
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scale = np.where(hi > 0, hi / (half - 1), 1.0).astype(np.float32)
        scale = scale.astype(np.float16).astype(np.float32)  # what the artifact stores
        zero = np.full(scale.shape, float(half), np.float32)
    else:
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        scale = np.maximum(scale.astype(np.float16).astype(np.float32), np.float32(6.1e-5))
        zero = np.clip(np.round(-lo / scale), 0, qmax).astype(np.float32)
    q = np.clip(np.round(wg / scale[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    return q, scale, zero


def quantize_groups(w: np.ndarray, bits: int, group: int, symmetric: bool, axis: int, search: bool = True):
    """Quantize ``w`` (2-D) in groups of ``group`` along ``axis``; returns (codes uint8, scale f32, zero f32).

    scale/zero have the shape of ``w`` with ``axis`` shrunk to the number of groups. ``search``: per group, try
    ranges shrunk by the factors in ``_SHRINK`` and keep the one with the least squared error (clipping a rare
    outlier often buys a finer step for the other weights); deterministic.
    """
    w = np.asarray(w, dtype=np.float32)
    wa = np.moveaxis(w, axis, -1)  # [..., K]
    k = wa.shape[-1]
    g = k if group == -1 else group
    wg = wa.reshape(wa.shape[:-1] + (k // g, g))
    if symmetric:
        lo0, hi0 = None, np.abs(wg).max(axis=-1)
    else:
        lo0, hi0 = np.minimum(wg.min(axis=-1), 0.0), np.maximum(wg.max(axis=-1), 0.0)
    best = None
    for f in (_SHRINK if search else (1.0,)):
        q, scale, zero = _codes(wg, None if lo0 is None else lo0 * f, hi0 * f, bits, symmetric)
        err = (((q.astype(np.float32) - zero[..., None]) * scale[..., None] - wg) ** 2).sum(-1)
        if best is None:
            best = [q, scale, zero, err]
            continue
        better = err < best[3]
        best[0] = np.where(better[..., None], q, best[0])
        best[1] = np.where(better, scale, best[1])
        best[2] = np.where(better, zero, best[2])
        best[3] = np.where(better, err, best[3])
    q, scale, zero = best[0], best[1], best[2]
    q = np.moveaxis(q.reshape(wa.shape), -1, axis)
    return q, np.moveaxis(scale, -1, axis), np.moveaxis(zero, -1, axis)


def dequantize_groups(q, scale, zero, group: int, axis: int) -> np.ndarray:
    q = np.moveaxis(np.asarray(q, np.float32), axis, -1)
    k = q.shape[-1]
    g = k if group == -1 else group
    s = np.repeat(np.moveaxis(scale, axis, -1), g, axis=-1)
    z = np.repeat(np.moveaxis(zero, axis, -1), g, axis=-1)
    return np.moveaxis((q - z) * s, -1, axis).astype(np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack uint8 codes in [0, 15] two per byte along the last axis (element 2j low nibble); odd sizes padded."""
    q = np.asarray(q, np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(p, np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out[..., :n]


def weight_only_pack(w_kn: np.ndarray, bits: int, group: int, symmetric: bool, x=None):
    """A matmul weight ``[K, N]`` → the arrays the weight-only kernel reads, plus the dequantized weight.

    ``x``: the layer's calibration inputs ``[rows, K]``; when given, GPTQ rounding (:func:`gptq_quantize`).
    Returns (arrays: dict name → ndarray in kernel argument order, dequantized fp32 ``[K, N]``).
    """
    if x is not None:
        q, s, z = gptq_quantize(w_kn, x, bits, group, symmetric, damp=GPTQ_DAMP, act_order=True)
    else:
        q, s, z = quantize_groups(w_kn, bits, group, symmetric, axis=0)
    deq = dequantize_groups(q, s, z, group, axis=0)
    arrays = {"qweight": pack_int4(q) if bits == 4 else q, "scales": s.astype(np.float16)}
    if not symmetric:
        arrays["zeros"] = z.astype(np.uint8)
    return arrays, deq


def embedding_pack(table: np.ndarray, bits: int, group: int, symmetric: bool):
    """An embedding table ``[V, D]`` → (arrays, dequantized table); groups along D."""
    q, s, z = quantize_groups(table, bits, group, symmetric, axis=1)
    deq = dequantize_groups(q, s, z, group, axis=1)
    arrays = {"qweight": pack_int4(q) if bits == 4 else q, "scales": s.astype(np.float16)}
    if not symmetric:
        arrays["zeros"] = z.astype(np.uint8)
    return arrays, deq


# -- INT8 (W8A8) -------------------------------------------------------------------------------------------
def int8_weight(w_kn: np.ndarray):
    """Per-output-channel symmetric int8: returns (q int8 [K, N], scale f32 [N])."""
    w = np.asarray(w_kn, np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def vnni_pack(q_kn: np.ndarray, lanes: int) -> np.ndarray:
    """int8 ``[K, N]`` → ``[ceil(N/lanes), ceil(K/4), lanes, 4]`` (zero padded), the vpdpbusd operand layout."""
    k, n = q_kn.shape
    kp, np_ = -(-k // 4) * 4, -(-n // lanes) * lanes
    pad = np.zeros((kp, np_), np.int8)
    pad[:k, :n] = q_kn
    return np.ascontiguousarray(pad.reshape(kp // 4, 4, np_ // lanes, lanes).transpose(2, 0, 3, 1))


def quantize_activation_rows(x: np.ndarray, qmax: int = 127, clip=None, per_token: bool = True):
    """Reference of the run-time activation quantizer: returns (codes int32 in [-qmax, qmax], scale f32 [M]).

    per_token: one scale per row (max |x| of the row), else one for the whole tensor. ``clip`` (static
    quantization): a calibrated upper bound on the range (a fixed scale when not per token).
    """
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1) if per_token else np.full(x.shape[0], np.abs(x).max(), np.float32)
    if clip is not None:
        amax = np.minimum(amax, clip) if per_token else np.full(x.shape[0], clip, np.float32)
    amax = np.maximum(amax, 1e-12).astype(np.float32)
    inv = (np.float32(qmax) / amax).astype(np.float32)
    q = np.clip(np.round(x * inv[:, None]), -qmax, qmax).astype(np.int32)
    return q, (amax / np.float32(qmax)).astype(np.float32)


def relative_error(ref: np.ndarray, approx: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    den = float(np.sqrt((ref ** 2).sum()))
    return float(np.sqrt(((ref - np.asarray(approx, np.float64)) ** 2).sum()) / den) if den > 0 else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of corresponding rows (the last axis is the feature axis)."""
    a = np.asarray(a, np.float64).reshape(-1, np.asarray(a).shape[-1] if np.asarray(a).ndim else 1)
    b = np.asarray(b, np.float64).reshape(a.shape)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    ok = den > 0
    if not ok.any():
        return 1.0
    return float(np.mean(num[ok] / den[ok]))


# -- GPTQ-style error compensation -------------------------------------------------------------------------
# Measured on the real MiniLM (32 stdlib sentences, 32 calibration sequences of 128 tokens, INT4-g32 asym, weights
# and embedding tables): natural order, damp 0.01: cos 0.9797 (16 sequences); act-order: 0.9816 (16) / 0.9841 (32);
# act-order + damp 0.1: 0.9835 (16) / 0.9848 (32); damp 0.03 / 0.3: 0.9839 / 0.9825 (16); symmetric: 0.9784;
# sequential (inputs from the already quantized layers): 0.9829, no gain. Hence act-order and 10% damping.
GPTQ_DAMP = 0.1

def gptq_quantize(w_kn: np.ndarray, x: np.ndarray, bits: int, group: int, symmetric: bool,
                  damp: float = 0.01, block: int = 128, act_order: bool = False):
    """Group-wise quantization of a matmul weight ``[K, N]`` that compensates each column's rounding error on the
    not-yet-quantized columns, weighted by the layer inputs ``x`` ``[rows, K]`` (GPTQ, Frantar et al. 2022).

    Returns (codes uint8 [K, N], scale f32 [K/g, N], zero f32 [K/g, N]) in the same format as
    :func:`quantize_groups` with ``axis=0``, so the kernels and the packer are unchanged. Deterministic.

    act_order: quantize the input channels in order of decreasing ``diag(H)`` (the channels with the largest
    inputs first, while the most columns are left to absorb their error). The groups stay the contiguous K
    ranges the kernel reads ("static groups"): each group's scale/zero is chosen from the weights as
    compensated when the group's first column comes up in that order.
    """
    W = np.asarray(w_kn, np.float64).T.copy()  # [N, K]: rows are output channels
    n, k = W.shape
    g = k if group == -1 else group
    X = np.asarray(x, np.float64).reshape(-1, k)
    H = 2.0 * X.T @ X / max(X.shape[0], 1)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += np.eye(k) * damp * float(np.mean(np.diag(H)))
    try:
        Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular
    except np.linalg.LinAlgError:
        return quantize_groups(w_kn, bits, group, symmetric, axis=0)
    if not act_order:
        block = g if g >= block else block // g * g  # groups never straddle blocks
    Q = np.zeros((n, k), np.uint8)
    S = np.zeros((n, k // g), np.float32)
    Z = np.zeros((n, k // g), np.float32)
    done = np.zeros(k // g, bool)
    pos = np.empty(k, np.int64)
    pos[perm] = np.arange(k)  # original channel -> its column in the permuted W
    qmax = (1 << bits) - 1
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].copy()
        E = np.zeros_like(W1)
        Hb = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = perm[b0 + j]  # original input channel
            gi = col // g
            if not done[gi]:  # this group's scale, from the weights as compensated so far
                members = pos[gi * g:(gi + 1) * g]
                cur = np.empty((n, g), np.float64)
                for t, c in enumerate(members):  # columns still in this block come from W1, later ones from W
                    cur[:, t] = W1[:, c - b0] if b0 <= c < b1 else W[:, c]
                _, sg, zg = quantize_groups(cur.astype(np.float32), bits, -1, symmetric, axis=1)
                S[:, gi], Z[:, gi] = sg[:, 0], zg[:, 0]
                done[gi] = True
            s, z = S[:, gi].astype(np.float64), Z[:, gi].astype(np.float64)
            q = np.clip(np.round(W1[:, j] / s) + z, 0, qmax)
            Q[:, col] = q.astype(np.uint8)
            err = (W1[:, j] - (q - z) * s) / Hb[j, j]
            W1[:, j:] -= np.outer(err, Hb[j, j:])
            E[:, j] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= E @ Hinv[b0:b1, b1:]
    return Q.T.copy(), S.T.copy(), Z.T.copy()
