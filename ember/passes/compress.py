"""Compression stage of ``ember.compile``: sparsity first (prune + pack), then quantization.

Both work on an :class:`~ember.frontends.spec.ImportedModel` — the Relax module plus its weights as numpy arrays —
before ``prepare``: a compression pass rewrites the graph (e.g. ``matmul(x, w)`` into a kernel that reads packed or
quantized weights) and replaces the weight arrays by what that kernel reads, so the artifact stores only the
compressed form. Each returns ``(imported, report)``; the reports go into the manifest under ``compression``.

The order matters: N:M pruning chooses which weights survive on full-precision values, quantization then scales
the survivors.
"""

from __future__ import annotations

from ..config import NM, Int8Dynamic, Int8Static, Mixed, WeightOnly
from ..errors import ConfigError

QUANTIZATION_TYPES = (WeightOnly, Int8Dynamic, Int8Static, Mixed)
SPARSITY_TYPES = (NM,)


def compress(imported, *, quantization=None, sparsity=None, target=None, example_inputs=None, verbose=False,
             precision=None):
    """Apply ``sparsity`` then ``quantization`` (either may be None); returns ``(imported, report)``.

    example_inputs: what the quantization report evaluates on when the scheme has no calibration data.
    precision: with ``"fp16"`` and a sparsity, the precision pass runs here, first (and the report gets a
    "precision" entry, which tells the caller not to run it again): the sparse kernels then read fp16 values, and
    TVM's ToMixedPrecision, which cannot see through the kernels' ``call_tir``, runs before they exist."""
    report = {"quantization": None, "sparsity": None}
    if sparsity is not None and precision is not None:
        from .precision import apply_precision, normalize_precision

        if normalize_precision(precision) == "fp16":
            imported, report["precision"] = apply_precision(imported, precision)
    if sparsity is not None:
        if not isinstance(sparsity, SPARSITY_TYPES):
            raise ConfigError(f"sparsity={sparsity!r}: use ember.NM(n, m), e.g. ember.NM(1, 16)")
        from .sparsity import apply_sparsity

        # The sparse layers are quantized by the sparsity pass itself (int8 values), the rest by quantization.
        imported, report["sparsity"] = apply_sparsity(imported, sparsity, target, quantization=quantization)
    if quantization is not None:
        if not isinstance(quantization, QUANTIZATION_TYPES):
            raise ConfigError(f"quantization={quantization!r}: use ember.WeightOnly, ember.Int8Dynamic, "
                              "ember.Int8Static or ember.Mixed")
        from .quantize import apply_quantization

        imported, report["quantization"] = apply_quantization(imported, quantization, target,
                                                              example_inputs=example_inputs, verbose=verbose)
    return imported, report
