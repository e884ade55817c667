"""Half precision for a model imported in fp32: ``precision="fp16"``.

Why a pass and not an fp16 import: torch's half-precision graphs trip TVM 0.27's frontend (an fp16 bias added to
an fp32 value, PLATFORM.md), so ember imports in fp32 and lowers precision here, on the Relax graph, with TVM's
``relax.transform.ToMixedPrecision``:

    before                                             after
    main(x: f32[1,128,384], w: f32[384,1536], b: f32[1536])
      y = matmul(x, w)            # f32                main(x: f32[...], w: f16[384,1536], b: f16[1536])
      z = add(y, b)               # f32                  xh = astype(x, "float16")
      return z                                           y = matmul(xh, w, out_dtype="float32")   # f16 x f16, f32 accumulate
                                                         z = add(astype(y, "float16"), b)         # f16
                                                         return z    # outputs keep the model's dtypes

* matmuls and convolutions read fp16 operands and accumulate in fp32 (``accumulate="float32"``, the default:
  tensor cores do this at full speed) or in fp16 (``accumulate="float16"``);
* ops TVM's policy keeps in fp32 (softmax, layer norm statistics, reductions) stay in fp32; elementwise ops follow
  their inputs;
* the weights become fp16 parameters (half the bytes in the artifact and in GPU memory): the numpy weights are
  converted here, once; integer weights (embedding ids, quantized data) are left alone;
* inputs and outputs keep their dtypes (the pass casts at the edges), so a caller's fp32 arrays still work and
  ``manifest.json`` still holds;
* identical casts of one value (one per consumer, as ToMixedPrecision emits them) are merged into one.

bf16 is refused with a clear message: ``ToMixedPrecision`` in TVM 0.27 only emits fp16.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, EmberError

PRECISIONS = ("fp32", "fp16")
_ACCUMULATE = {"float32", "float16"}


def normalize_precision(precision) -> str:
    """``None``/"fp32"/"float32" -> "fp32", "fp16"/"float16"/"half" -> "fp16"; anything else: ConfigError."""
    if precision is None:
        return "fp32"
    p = str(precision).lower()
    p = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16"}.get(p, p)
    if p in ("bf16", "bfloat16"):
        raise ConfigError(f"precision={precision!r}: bf16 is not supported yet (TVM 0.27's ToMixedPrecision only "
                          "emits fp16); use precision='fp16' or 'fp32'")
    if p not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    return p


def apply_precision(imported, precision, *, accumulate: str = "float32"):
    """Return ``(imported, report)`` with the graph lowered to ``precision`` (see module doc).

    ``imported`` is an :class:`~ember.frontends.spec.ImportedModel` whose main takes inputs then weights.
    """
    import tvm
    import tvm_ffi
    from tvm import relax

    precision = normalize_precision(precision)
    if precision == "fp32":
        return imported, None
    if accumulate not in _ACCUMULATE:
        raise ConfigError(f"accumulate={accumulate!r}: use 'float32' or 'float16'")
    mod = imported.mod
    main = mod["main"]
    n_inputs = len(main.params) - len(imported.params)
    weight_vars = list(main.params)[n_inputs:]
    # Only fp32 weights become fp16 parameters; ToMixedPrecision matches them by name, so names must be unique.
    names = [v.name for v in weight_vars]
    fp32_names = [v.name for v, p in zip(weight_vars, imported.params)
                  if np.asarray(p).dtype == np.float32]
    if len(set(names)) != len(names):
        raise ConfigError("precision='fp16' needs unique weight names in the imported graph; this model repeats "
                          "some — please report it with the model")
    def lower(names):
        return tvm.transform.Sequential([
            relax.transform.ConvertToDataflow(),
            relax.transform.ToMixedPrecision(out_dtype=accumulate, fp16_input_names=names),
            # ToMixedPrecision casts an fp32 value once per consumer: a layer norm feeding the Q, K and V projections
            # became three identical reshape + astype kernels (MiniLM: 12 of 151 launches, ~14 us on the H100).
            relax.transform.EliminateCommonSubexpr(),
        ])(mod)

    cast_in_graph = False
    try:
        new_mod = lower(fp32_names)
    except tvm.error.InternalError:
        cast_in_graph = True
        # TVM 0.27's ToMixedPrecision fails on named fp16 inputs when the function has symbolic shapes (a dynamic
        # batch: "no block is being built"). Without names the weights stay fp32 parameters cast to fp16 in the
        # graph; LiftTransformParams moves those casts to compile time, so the artifact still stores fp16.
        new_mod = lower([])
    # ToMixedPrecision keeps the function's signature apart from the named weights; the manifest relies on it.
    if not tvm_ffi.structural_equal(main.ret_ty, new_mod["main"].ret_ty):
        raise EmberError(f"precision='fp16' changed the model's output types ({main.ret_ty} -> "
                         f"{new_mod['main'].ret_ty}); please report this with the model")
    new_params = []
    half = 0
    for v, p in zip(list(new_mod["main"].params)[n_inputs:], imported.params):
        dtype = str(v.ty.dtype)
        arr = np.asarray(p)
        if dtype == "float16" and arr.dtype != np.float16:
            arr = arr.astype(np.float16)
            half += 1
        new_params.append(arr)
    imported.mod = new_mod
    imported.params = new_params
    report = {"precision": precision, "accumulate": accumulate, "fp16_weights": half, "weights": len(new_params)}
    if cast_in_graph:
        report["weights_cast_at_compile_time"] = True  # dynamic shapes: see the fallback above
    return imported, report


