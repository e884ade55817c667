"""ember: compile PyTorch and ONNX models into small, fast artifacts that run on the TVM runtime alone.

    import ember
    compiled = ember.compile(torch_module, (example_input,))   # or ember.compile("model.onnx")
    out = compiled(x)                                          # numpy in -> numpy out, torch in -> torch out
    compiled.export("model.ember")
    deployed = ember.load("model.ember")                       # needs only TVM's runtime: no torch, no compiler

Importing ember loads nothing heavy: the compiler (and torch) are imported on the first call to ``compile``,
so an application that only loads artifacts never pays for them.
"""

from .config import NM, Int8Dynamic, Int8Static, Mixed, Tuning, WeightOnly
from .errors import (
    ArtifactError,
    ConfigError,
    EmberError,
    InputError,
    ModelLoadError,
    TargetError,
    UnsupportedOpError,
)
from .version import __version__

# TVM's CPU thread pool would use half the cores on machines without SMT (ember.cpu_threads says why); this
# must run before any kernel launches parallel work.
from . import cpu_threads as _cpu_threads  # noqa: E402

_cpu_threads.configure()


def compile(model, example_inputs=None, *, target="host", dynamic_batch=False, input_names=None,
            output_names=None, quantization=None, sparsity=None, tuning=None,
            precision=None, cuda_graph=None):  # noqa: A001 - the public name users expect
    """Compile a model for ``target`` and return a callable :class:`ember.runtime.CompiledModel`.

    model: a ``torch.nn.Module`` (with ``example_inputs``), a ``torch.export.ExportedProgram`` or a path to one
        saved with ``torch.export.save`` (``.pt2``), an ONNX ``ModelProto`` or a path to a ``.onnx`` file.
    example_inputs: a tuple of tensors/arrays for torch models (ignored for ONNX, whose graph declares shapes).
    target: a named target (``ember targets`` lists them; ``"host"`` is this machine's CPU) or a TVM target dict.
    dynamic_batch: make dimension 0 of every input symbolic, so one artifact serves every batch size.
    tuning: ``ember.Tuning(database=DIR, apply_only=True)`` uses the kernels tuned into DIR for this target (each
        only where it measured faster than ember's rule schedule); ``ember.Tuning(trials=N or minutes=M,
        database=DIR)`` tunes first (see ember.schedules.tune). The manifest's "tuning" says what was applied.
    input_names / output_names: names for a torch model's inputs and outputs (default: forward()'s argument
        names, and output0, output1, ...); ONNX models keep the names in their graph.
    precision: "fp32" (default) or "fp16": import in fp32, then compute in half precision (fp32 accumulation in
        matmuls, fp16 weights in the artifact; inputs and outputs keep their dtypes). See ember.passes.precision.
    cuda_graph: CUDA targets: replay the kernels as a CUDA graph (captured on the first call) to save launch
        overhead; default on for CUDA (None), False turns it off. Only static-shape parts are captured.
    """
    from .compiler.build import compile_model

    return compile_model(model, example_inputs, target=target, dynamic_batch=dynamic_batch,
                         input_names=input_names, output_names=output_names, quantization=quantization, sparsity=sparsity, tuning=tuning,
                         precision=precision, cuda_graph=cuda_graph)


def load(path, device="cpu"):
    """Load an exported artifact (directory or .tar) with TVM's runtime only; returns a CompiledModel."""
    from .runtime.load import load as _load

    return _load(path, device=device)


__all__ = [
    "compile", "load", "__version__", "EmberError", "ModelLoadError", "UnsupportedOpError", "InputError",
    "ArtifactError", "TargetError", "ConfigError", "WeightOnly", "Int8Dynamic", "Int8Static", "Mixed", "NM",
    "Tuning",
]


def __getattr__(name):
    # Submodules reachable as attributes without importing them up front: ``ember.quantization.DynamicQuantizer``.
    if name in ("quantization",):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
