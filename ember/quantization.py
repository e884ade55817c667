"""The one-liner quantizer users of other compression tools expect.

    import ember.quantization
    model_q = ember.quantization.DynamicQuantizer(model, bits=4, example_inputs=(x,)).optimize()
    y = model_q(x)              # a compiled ember model (ember.runtime.CompiledModel)
    model_q.export("model.ember")

"Dynamic" means no calibration step is required:

* ``bits=8``: :class:`ember.Int8Dynamic` — int8 weights per channel, activations quantized per token at run time,
  int8 GEMM kernels (VNNI on x86 where available).
* ``bits=4``: :class:`ember.WeightOnly` INT4, group size ``group_size`` (32), asymmetric — weights decoded
  inside the matmul kernels; activations stay fp32. Pass ``calibration=`` batches to get GPTQ rounding.

The accuracy report is in ``model_q.manifest["compression"]["quantization"]`` (and printed with ``verbose``).
"""

from __future__ import annotations

from .config import Int8Dynamic, WeightOnly
from .errors import ConfigError


class DynamicQuantizer:
    def __init__(self, model, bits: int = 8, *, example_inputs=None, group_size: int = 32, calibration=None,
                 target: str = "host", dynamic_batch: bool = False, verbose: bool = False, **compile_kwargs):
        if bits not in (4, 8):
            raise ConfigError(f"DynamicQuantizer.bits={bits!r}: use 8 (dynamic INT8) or 4 (INT4 weight-only)")
        self.model = model
        self.example_inputs = example_inputs
        self.target = target
        self.dynamic_batch = dynamic_batch
        self.verbose = verbose
        self.compile_kwargs = compile_kwargs
        if bits == 8:
            if calibration is not None:
                raise ConfigError("DynamicQuantizer.calibration: dynamic INT8 computes activation scales at run "
                                  "time; use ember.Int8Static(calibration=...) for calibrated ranges")
            self.config = Int8Dynamic()
        else:
            self.config = WeightOnly(bits=4, group_size=group_size, symmetric=False, calibration=calibration)

    def optimize(self):
        """Quantize and compile; returns the compiled, callable model."""
        from .compiler.build import compile_model

        return compile_model(self.model, self.example_inputs, target=self.target, dynamic_batch=self.dynamic_batch,
                             quantization=self.config, verbose=self.verbose, **self.compile_kwargs)


__all__ = ["DynamicQuantizer"]
