"""Configuration objects: one frozen dataclass per choice, validated when it is created.

    ember.compile(model, x, quantization=ember.WeightOnly(bits=4, group_size=32))
    ember.compile(model, x, quantization=ember.Int8Static(calibration=batches, method="percentile"))
    ember.compile(model, x, sparsity=ember.NM(1, 16))
    ember.compile(model, x, tuning=ember.Tuning(trials=2000, database="tuning/host"))

Errors name the field, the value given and the allowed values. The CLI parses its flags into the same objects
(``parse_quantization("int4-g32")``, ``parse_sparsity("1:16")``), so both paths validate alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


def _check(cond: bool, cls, name: str, value, allowed: str):
    if not cond:
        raise ConfigError(f"{cls.__name__}.{name}={value!r}: {allowed}")


# -- quantization ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightOnly:
    """Weight-only quantization of linear/matmul weights, group-wise along the reduction axis.

    bits: 4 or 8. group_size: weights per scale (must divide the reduction dimension; -1: one group per row).
    symmetric: scales only (True) or scales and zero points (False; one more bit of range, usually more accurate
        at 4 bits). calibration: optional input batches (as for :class:`Int8Static`); when given, each layer's
        rounding error is compensated on these inputs (GPTQ) and the report is measured on them.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    calibration: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _check(self.bits in (4, 8), type(self), "bits", self.bits, "ember quantizes weights to 4 or 8 bits")
        _check(isinstance(self.symmetric, bool), type(self), "symmetric", self.symmetric, "use True or False")
        _check(isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 2), type(self),
               "group_size", self.group_size, "use an integer ≥ 2 that divides the reduction dimension, or -1")


@dataclass(frozen=True)
class Int8Dynamic:
    """Dynamic quantization: int8 weights (per output channel), activations quantized at run time.

    activation_bits: 8 (default) or 4. granularity: scales per "tensor" or per "token" (row).
    convs: conv2d layers INT8 too — "auto" (on CPU targets with a VNNI dot product, where the int8 conv is faster
        than fp32; elsewhere they stay fp32), "on" (every CPU target) or "off". Convs always use one activation
        scale per tensor.
    """

    activation_bits: int = 8
    granularity: str = "token"
    convs: str = "auto"

    def __post_init__(self):
        _check(self.activation_bits in (4, 8), type(self), "activation_bits", self.activation_bits, "use 8 or 4")
        _check(self.granularity in ("tensor", "token"), type(self), "granularity", self.granularity,
               "use 'tensor' or 'token'")
        _check(self.convs in CONV_MODES, type(self), "convs", self.convs, "use 'auto', 'on' or 'off'")


CONV_MODES = ("auto", "on", "off")


CALIBRATION_METHODS = ("minmax", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class Int8Static:
    """Static W8A8: activation scales fixed at compile time from calibration data.

    calibration: a sequence of input batches (each a tuple of arrays/tensors in the model's input order, or a
        dict by input name). method: how ranges are chosen from the observed values: "minmax", "percentile"
        (``percentile`` of |x|), "mse" or "entropy". granularity: activation scales per "tensor" (one calibrated
        scale) or "token" (each row's own range, capped by the calibrated clip). smoothing: SmoothQuant strength
        alpha — per input channel, activations are divided and weights multiplied by
        ``max|x|^alpha / max|w|^(1-alpha)`` so outlier channels stop dominating a per-tensor scale (linear layers;
        convs are not smoothed). convs: as for :class:`Int8Dynamic` (conv scales are per tensor, calibrated).
    """

    calibration: Any = None
    method: str = "minmax"
    percentile: float = 99.99
    granularity: str = "tensor"
    smoothing: float | None = None
    convs: str = "auto"

    def __post_init__(self):
        if self.smoothing is not None:
            _check(0.0 <= float(self.smoothing) <= 1.0, type(self), "smoothing", self.smoothing,
                   "use a SmoothQuant migration strength in [0, 1] (0: off), or None (0.5 per tensor, off per token)")
        _check(self.calibration is not None, type(self), "calibration", self.calibration,
               "give a sequence of input batches (a few dozen real inputs) to calibrate on")
        _check(self.method in CALIBRATION_METHODS, type(self), "method", self.method,
               f"use one of {', '.join(CALIBRATION_METHODS)}")
        _check(50.0 < float(self.percentile) <= 100.0, type(self), "percentile", self.percentile,
               "use a value in (50, 100]")
        _check(self.granularity in ("tensor", "token"), type(self), "granularity", self.granularity,
               "use 'tensor' or 'token'")
        _check(self.convs in CONV_MODES, type(self), "convs", self.convs, "use 'auto', 'on' or 'off'")


@dataclass(frozen=True)
class Mixed:
    """4/8-bit weights chosen per layer by measured sensitivity, within an accuracy budget.

    budget: the largest allowed drop of the end-to-end metric (1 - cosine similarity of the outputs against
        fp32 on the calibration data), e.g. 0.01. calibration: input batches as for :class:`Int8Static`.
    """

    budget: float = 0.01
    calibration: Any = None
    group_size: int = 32

    def __post_init__(self):
        _check(0.0 < float(self.budget) < 1.0, type(self), "budget", self.budget, "use a value in (0, 1)")
        _check(self.calibration is not None, type(self), "calibration", self.calibration,
               "give a sequence of input batches to measure each layer's sensitivity on")


# -- sparsity ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NM:
    """N:M structured sparsity: at most ``n`` non-zeros in every ``m`` consecutive weights of the reduction axis."""

    n: int
    m: int

    def __post_init__(self):
        _check(isinstance(self.m, int) and 2 <= self.m <= 64, type(self), "m", self.m, "use 2 ≤ m ≤ 64 (e.g. 4, 8, 16)")
        _check(isinstance(self.n, int) and 1 <= self.n < self.m, type(self), "n", self.n,
               f"use 1 ≤ n < m (= {self.m}), e.g. NM(2, 4) or NM(1, 16)")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# -- tuning ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tuning:
    """Auto-tuning with MetaSchedule and the XGBoost cost model (see :mod:`ember.schedules.tune`).

    trials / minutes: the budget (whichever is reached first; at least one must be set unless only applying a
        database). trials counts measured candidates over all kernels of the model.
    database: the root directory of the tuning databases (one append-only sub-directory per target, created if
        missing, resumed if not); default ``~/.cache/ember/tuning``.
    rpc_tracker ("HOST:PORT") and device_key: measure on remote devices registered with TVM's RPC tracker.
    apply_only: use the records in ``database`` without tuning more.
    trials_per_iter: candidates measured per batch (records are fsynced once per batch).
    builder: "pool" (persistent worker processes, the default), "inprocess", or "stock" (MetaSchedule's own
        LocalBuilder: a new pool per batch, each worker importing every tensor intrinsic; for comparison only).
    workers: build processes (default: the target's cores); with RPC, also the number of parallel remote sessions.
    seed: random seed of the search (None: random).
    """

    trials: int | None = None
    minutes: float | None = None
    database: str | None = None
    rpc_tracker: str | None = None
    device_key: str | None = None
    apply_only: bool = False
    trials_per_iter: int = 64
    builder: str = "pool"
    workers: int | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.trials is not None:
            _check(isinstance(self.trials, int) and not isinstance(self.trials, bool) and self.trials > 0,
                   type(self), "trials", self.trials, "use a positive integer")
        if self.minutes is not None:
            _check(isinstance(self.minutes, (int, float)) and not isinstance(self.minutes, bool)
                   and float(self.minutes) > 0, type(self), "minutes", self.minutes, "use a positive number")
        if self.database is not None:
            _check(isinstance(self.database, (str, os.PathLike)) and str(self.database) != "", type(self),
                   "database", self.database, "use a directory path")
        if self.apply_only:
            _check(self.database is not None, type(self), "database", self.database,
                   "apply_only needs the database directory to read")
            _check(self.trials is None and self.minutes is None, type(self), "trials", self.trials,
                   "apply_only=True does not tune; drop trials/minutes or set apply_only=False")
        else:
            _check(self.trials is not None or self.minutes is not None, type(self), "trials", self.trials,
                   "set trials or minutes (the tuning budget), or apply_only=True with a database")
        _check(isinstance(self.trials_per_iter, int) and 1 <= self.trials_per_iter <= 512, type(self),
               "trials_per_iter", self.trials_per_iter, "use an integer in [1, 512]")
        _check(self.builder in ("pool", "inprocess", "stock"), type(self), "builder", self.builder,
               "use 'pool' (persistent build workers), 'inprocess', or 'stock' (MetaSchedule's LocalBuilder, "
               "for comparison)")
        if self.workers is not None:
            _check(isinstance(self.workers, int) and self.workers >= 1, type(self), "workers", self.workers,
                   "use a positive integer")
        if self.device_key is not None and self.rpc_tracker is None:
            _check(False, type(self), "rpc_tracker", self.rpc_tracker,
                   "device_key needs rpc_tracker=HOST:PORT (the tracker the devices registered with)")
        if self.rpc_tracker is not None:
            host, _, port = str(self.rpc_tracker).rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, type(self), "rpc_tracker",
                   self.rpc_tracker, "write HOST:PORT, e.g. 127.0.0.1:9190")
            _check(bool(self.device_key), type(self), "device_key", self.device_key,
                   "name the key the devices registered with the tracker")
            _check(not self.apply_only, type(self), "rpc_tracker", self.rpc_tracker,
                   "apply_only does not measure anything; drop rpc_tracker")

    @property
    def tracker_address(self) -> tuple[str, int] | None:
        if self.rpc_tracker is None:
            return None
        host, _, port = str(self.rpc_tracker).rpartition(":")
        return host, int(port)


# -- CLI spellings -----------------------------------------------------------------------------------------
def parse_quantization(text: str | None):
    """``int8`` / ``int8-dynamic`` → Int8Dynamic; ``int4-g32`` / ``int8-weight`` → WeightOnly.

    Static and mixed schemes need calibration data and are built through the Python API (or a CLI that passes
    calibration files)."""
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("int8", "int8-dynamic", "dynamic"):
        return Int8Dynamic()
    if t == "int4-dynamic":
        return Int8Dynamic(activation_bits=4)
    symmetric = not t.endswith("-asym")  # int4-g32-asym: zero points too (more accurate at 4 bits)
    if not symmetric:
        t = t[: -len("-asym")]
    if t.startswith(("int4", "int8")) and ("-g" in t or t.endswith("-weight")):
        bits = int(t[3])
        group = -1 if t.endswith("-weight") else t.split("-g", 1)[1]
        try:
            group = int(group)
        except ValueError:
            raise ConfigError(f"--quantize {text!r}: the group size after -g must be a number, e.g. int4-g32") from None
        return WeightOnly(bits=bits, group_size=group, symmetric=symmetric)
    raise ConfigError(f"--quantize {text!r}: use int8 (dynamic), int4-dynamic, int4-gGROUP / int8-gGROUP "
                      "(weight-only, e.g. int4-g32; add -asym for zero points) or int8-weight (per channel)")


def parse_sparsity(text: str | None):
    """``1:16`` → NM(1, 16)."""
    if text is None:
        return None
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise ConfigError(f"--sparsity {text!r}: write N:M, e.g. 2:4 or 1:16")
    return NM(int(n), int(m))


__all__ = ["WeightOnly", "Int8Dynamic", "Int8Static", "Mixed", "NM", "Tuning", "parse_quantization",
           "parse_sparsity", "CALIBRATION_METHODS"]
