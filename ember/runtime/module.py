"""CompiledModel: a compiled model you can call.

Inputs are numpy arrays or torch tensors (positional in the model's order, or by name). Outputs come back as the
same kind: numpy in, numpy out; torch in, torch out — torch tensors cross via DLPack in both directions, without
a copy. Every call is checked against the input specs first, so a wrong count, rank, size or dtype is a clear
``InputError``, never a crash inside a kernel.

What is shared and what is per call — one CompiledModel may be called from many threads at once:

- shared by every thread: the library (model.so: the VM executable and the kernels) and the weights. They are
  loaded once; on CPU the tensors read from params.bin are the very ones every call gets (no copy, none per
  thread), on a GPU they are copied to the device once, on the first call.
- per thread: a Relax VM, created on the thread's first call (a VM keeps registers and frames while it runs, so
  two threads must never share one). Creating it is cheap; it holds no weights.
- per call: the inputs (moved to the device), the intermediate buffers and the outputs, all taken from TVM's
  pooled allocator (one per device, process-wide, thread-safe) and returned to it when freed, so memory
  grows with the number of calls in flight times the activations of one call, not with the weights.
- the machine's cores: CPU kernels parallelise over TVM's worker threads, so calls running at the same time
  share the cores (throughput rises with threads only while cores are idle).

tests/runtime/test_concurrency.py checks this: 8 threads with their own inputs and batch sizes, distinct VMs,
one set of weights, and resident memory that does not grow by the weights per thread.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from ..frontends.spec import TensorSpec


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


@dataclass(frozen=True)
class BenchmarkResult:
    mean_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    std_ms: float
    runs: int

    def __str__(self) -> str:
        return (f"median {self.median_ms:.3f} ms, mean {self.mean_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, "
                f"min {self.min_ms:.3f} ms over {self.runs} runs")

    def to_json(self) -> dict:
        return asdict(self)


class CompiledModel:
    """A model compiled by ember, in memory (from ``ember.compile``) or loaded (from ``ember.load``)."""

    def __init__(self, rt_mod, params, manifest: dict, device: str = "cpu", artifact_dir=None):
        import tvm

        self._rt_mod = rt_mod
        self.manifest = manifest
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self.target = manifest["target"]["name"]
        self.device_kind = device
        self._dev = tvm.device(device, 0)
        self._artifact_dir = artifact_dir  # keeps a temporary extraction alive as long as the model
        self._params = None
        self._raw_params = params  # list of numpy arrays or tvm tensors, moved to the device on first use
        self._local = threading.local()
        self._init_lock = threading.Lock()

    # -- setup ---------------------------------------------------------------------------------------------
    def _vm(self):
        vm = getattr(self._local, "vm", None)
        if vm is None:
            from tvm.runtime.vm import VirtualMachine

            with self._init_lock:
                if self._params is None:
                    import tvm

                    self._params = [self._place(p, tvm) for p in self._raw_params]
                    self._raw_params = None
                vm = VirtualMachine(self._rt_mod, self._dev)
            self._local.vm = vm
        return vm

    def _place(self, p, tvm):
        """One weight on this model's device. A TVM tensor already there (the CPU weights ember.load reads
        from params.bin) is used as it is: copying it would hold every weight twice until the originals are
        freed (a 2x memory peak on the first call) and cost a copy of all weights for nothing."""
        if isinstance(p, np.ndarray) or not hasattr(p, "copyto"):
            return tvm.runtime.tensor(np.asarray(p, order="C"), self._dev)
        return p if p.device == self._dev else p.copyto(self._dev)

    # -- input checking ------------------------------------------------------------------------------------
    def _order(self, args, kwargs):
        names = [s.name for s in self.inputs]
        if kwargs:
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                raise InputError(f"unknown input name(s) {unknown}; this model takes {names}")
        total = len(args) + len(kwargs)
        if total != len(names):
            raise InputError(f"this model takes {len(names)} input(s) ({', '.join(s.describe() for s in self.inputs)})"
                             f", got {total}")
        ordered = list(args)
        for name in names[len(args):]:
            if name not in kwargs:
                raise InputError(f"missing input '{name}'")
            ordered.append(kwargs[name])
        dup = [n for n in names[:len(args)] if n in kwargs]
        if dup:
            raise InputError(f"input(s) {dup} given both by position and by name")
        return ordered

    def _check(self, values):
        bound: dict[str, int] = {}
        for spec, v in zip(self.inputs, values):
            shape = tuple(int(s) for s in v.shape)
            dtype = str(v.dtype).replace("torch.", "")
            if dtype != spec.dtype:
                raise InputError(f"input '{spec.name}' must be {spec.dtype}, got {dtype}; "
                                 f"convert it (e.g. .astype('{spec.dtype}')) before calling")
            if len(shape) != len(spec.shape):
                raise InputError(f"input '{spec.name}' must have {len(spec.shape)} dimensions "
                                 f"{list(spec.shape)}, got shape {list(shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InputError(f"input '{spec.name}' dimension {axis} must be {want} (shape "
                                         f"{list(spec.shape)}), got {got} (shape {list(shape)})")
                elif bound.setdefault(want, got) != got:
                    raise InputError(f"dimension '{want}' is {bound[want]} in an earlier input but {got} in "
                                     f"'{spec.name}'; inputs sharing a dimension name must agree")
                elif got < 1:
                    raise InputError(f"input '{spec.name}' dimension {axis} ('{want}') must be at least 1")

    def _to_device(self, values):
        import tvm

        out = []
        for spec, v in zip(self.inputs, values):
            if _is_torch(v):
                if v.device.type != self._dev_torch_type():
                    raise InputError(f"input '{spec.name}' is on torch device '{v.device}', but this model runs "
                                     f"on {self.device_kind}; move it with .to('{self._dev_torch_type()}')")
                out.append(tvm.runtime.from_dlpack(v.detach().contiguous()))
            else:
                arr = np.asarray(v, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
                out.append(tvm.runtime.tensor(arr, self._dev))
        return out

    def _dev_torch_type(self) -> str:
        return {"cpu": "cpu", "cuda": "cuda", "rocm": "cuda", "metal": "mps"}.get(self.device_kind, "cpu")

    def _prepare(self, args, kwargs):
        values = self._order(args, kwargs)
        for spec, v in zip(self.inputs, values):
            if not (_is_torch(v) or isinstance(v, (np.ndarray, np.generic, int, float, bool))):
                raise InputError(f"input '{spec.name}' is a {type(v).__name__}; pass a numpy array or torch tensor")
        values = [np.asarray(v) if not _is_torch(v) and not isinstance(v, np.ndarray) else v for v in values]
        self._check(values)
        return values, self._to_device(values)

    # -- running -------------------------------------------------------------------------------------------
    def run_device(self, device_inputs):
        """Run on inputs already on the device (tvm tensors); returns a list of tvm tensors."""
        vm = self._vm()
        res = vm["main"](*device_inputs, *self._params)
        if hasattr(res, "numpy"):
            return [res]
        return list(res)

    def __call__(self, *args, **kwargs):
        values, dev_inputs = self._prepare(args, kwargs)
        outs = self.run_device(dev_inputs)
        if values and all(_is_torch(v) for v in values):
            import torch

            result = [torch.from_dlpack(o) for o in outs]
        else:
            result = [o.numpy() for o in outs]
        return result[0] if len(result) == 1 else tuple(result)

    def benchmark(self, *args, warmup: int = 5, repeat: int = 30, min_seconds: float = 0.5, **kwargs):
        """Time inference on the given inputs (already on the device, so transfers are not counted)."""
        _, dev_inputs = self._prepare(args, kwargs)
        for _ in range(warmup):
            self.run_device(dev_inputs)
        self._dev.sync()
        times = []
        start = time.perf_counter()
        while len(times) < repeat or (time.perf_counter() - start < min_seconds and len(times) < 100 * repeat):
            t0 = time.perf_counter()
            self.run_device(dev_inputs)
            self._dev.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return BenchmarkResult(
            mean_ms=statistics.fmean(times), median_ms=statistics.median(times),
            p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))], min_ms=times[0],
            std_ms=statistics.pstdev(times), runs=len(times))

    def export(self, path, *, overwrite: bool = False) -> str:
        """Write the artifact (a directory, or a single file when ``path`` ends in .tar); returns the path."""
        from ..compiler.export import export_artifact

        return export_artifact(self, path, overwrite=overwrite)

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs)
        return f"<ember.CompiledModel target={self.target} inputs=({ins}) outputs=({outs})>"
