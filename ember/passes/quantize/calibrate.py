"""Static activation ranges from calibration data: minmax, percentile, MSE and entropy (KL) clipping.

Every method sees all the |x| values one layer input took over all calibration batches (in batch order) and
returns one clip value ``c``; the layer's activations are then quantized with scale ``c / 127``. All methods
are deterministic functions of the data: no sampling, fixed histogram bins, ties broken toward the smaller clip.
"""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError

BINS = 2048


def _histogram(a: np.ndarray, amax: float):
    hist, edges = np.histogram(a, bins=BINS, range=(0.0, amax))
    return hist.astype(np.float64), edges


def clip_minmax(a: np.ndarray, **_) -> float:
    return float(a.max())


def clip_percentile(a: np.ndarray, percentile: float = 99.99, **_) -> float:
    return float(np.percentile(a, percentile, method="linear"))


def clip_mse(a: np.ndarray, qmax: int = 127, **_) -> float:
    """The clip minimizing the expected squared error: rounding noise (step²/12) inside, clipping error outside."""
    amax = float(a.max())
    if amax <= 0:
        return 0.0
    hist, edges = _histogram(a, amax)
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_err = amax, np.inf
    for i in range(BINS // 16, BINS + 1, 8):
        c = edges[i]
        step = c / qmax
        inside = hist[:i].sum()
        outside = hist[i:]
        err = inside * step * step / 12 + float((outside * (centers[i:] - c) ** 2).sum())
        if err < best_err - 1e-12 * max(err, 1.0):
            best, best_err = c, err
    return float(best)


def clip_entropy(a: np.ndarray, qmax: int = 127, **_) -> float:
    """TensorRT-style KL calibration: the clip whose ``qmax + 1``-level quantized histogram diverges least."""
    amax = float(a.max())
    if amax <= 0:
        return 0.0
    hist, edges = _histogram(a, amax)
    levels = qmax + 1
    best, best_kl = amax, np.inf
    for i in range(levels, BINS + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # clipped values pile up in the last bin
        if p.sum() == 0:
            continue
        # Merge the i bins into `levels` groups, spread each group's mass over its non-empty bins.
        idx = (np.arange(i) * levels) // i
        nonzero = hist[:i] > 0
        mass = np.bincount(idx, weights=hist[:i], minlength=levels)
        count = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[idx] / np.maximum(count[idx], 1), 0.0)
        q[-1] += 0.0
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
        m = ps > 0
        kl = float(np.sum(ps[m] * np.log(ps[m] / np.maximum(qs[m], 1e-12))))
        if kl < best_kl - 1e-12:
            best, best_kl = edges[i], kl
    return float(best)


METHODS = {"minmax": clip_minmax, "percentile": clip_percentile, "mse": clip_mse, "entropy": clip_entropy}


def calibrate(values: list, method: str, percentile: float = 99.99) -> float:
    """One clip for a layer input, from its observed tensors (a list of arrays, one per batch)."""
    if method not in METHODS:
        raise ConfigError(f"Int8Static.method={method!r}: use one of {', '.join(METHODS)}")
    a = np.concatenate([np.abs(np.asarray(v, np.float32)).ravel() for v in values])
    c = METHODS[method](a, percentile=percentile)
    return float(max(c, 1e-8))


def smoothing_factors(values: list, w_kn: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant (Xiao et al. 2023) per-input-channel factors ``s = max|x|^a / max|w|^(1-a)`` (1 where a channel
    is all zero), bounded to [1e-4, 1e4]: x / s has flatter channels, W * s absorbs them."""
    chan = np.max([np.abs(v).max(axis=0) for v in values], axis=0).astype(np.float64)
    wmax = np.abs(np.asarray(w_kn, np.float64)).max(axis=1)
    ok = (chan > 0) & (wmax > 0)
    s = np.ones_like(chan)
    s[ok] = chan[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def batches(calibration, input_names: list[str]) -> list[tuple]:
    """Normalize user calibration data to a list of input tuples of numpy arrays (model input order)."""
    try:
        items = list(calibration)
    except TypeError:
        raise ConfigError("calibration: give a sequence of input batches (tuples of arrays/tensors, or dicts "
                          "by input name)") from None
    if not items:
        raise ConfigError("calibration: the sequence is empty; give a few dozen real input batches")
    out = []
    for i, b in enumerate(items):
        if isinstance(b, dict):
            missing = [n for n in input_names if n not in b]
            if missing:
                raise ConfigError(f"calibration batch {i}: missing input(s) {', '.join(missing)}")
            b = tuple(b[n] for n in input_names)
        elif not isinstance(b, (tuple, list)):
            b = (b,)
        if len(b) != len(input_names):
            raise ConfigError(f"calibration batch {i} has {len(b)} arrays; the model takes {len(input_names)} "
                              f"inputs ({', '.join(input_names)})")
        out.append(tuple(to_numpy(a) for a in b))
    return out


def to_numpy(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)
