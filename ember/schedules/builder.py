"""MetaSchedule builders that do not pay TVM's 35-40 s ``import tvm.s_tir.tensor_intrin`` per batch.

Why MetaSchedule's ``LocalBuilder`` makes zero valid trials here (measured on this 2-core Xeon, 2026-11-26):

* its build function starts with ``import tvm.s_tir.tensor_intrin``, which takes 35 s here (38.9 s wall for a
  fresh ``python -c "import tvm.s_tir.tensor_intrin"``; ``-X importtime``: 43 s of it is the CUDA intrinsics,
  registered by parsing TVMScript at import), longer than the builder's default 30 s timeout;
* it creates a new ``PopenPoolExecutor`` for every batch (to dodge a worker memory leak), so fresh workers pay the
  import again for every batch of candidates.

What ember does instead, and why:

* ``PersistentBuilder`` (the default): one pool of worker processes created once per tuning run and reused for
  every batch; the workers never import ``tensor_intrin`` at all. Building a scheduled PrimFunc does not need the
  intrinsic registry: tensorization already happened in the tuning process, where ``tensorize`` replaced blocks
  with the intrinsics' bodies, so the module a worker receives is plain TIR. A worker costs one ``import tvm``
  (2-7 s on a busy machine) once, then ~0.1-0.5 s per candidate (LLVM codegen + tar export). Workers are separate
  processes, so an LLVM crash or a runaway build is killed by the timeout and the worker respawned, and tuning goes
  on; after ``recycle_after`` builds a worker is replaced, which bounds the leak the stock builder worried about.
* ``InProcessBuilder``: builds in the tuning process itself. No pickling, no worker start-up, but a crash in codegen
  kills the whole tuning run and builds run one at a time. Kept for comparison
  (``benchmarks/tune_throughput.py --builder inprocess``) and for debugging.
* The tuning process itself needs the *x86/ARM* intrinsics registered (MetaSchedule's default CPU rules look up
  the VNNI / NEON dot-product intrinsics by name), not the CUDA ones: ``register_cpu_intrinsics`` imports just
  ``tensor_intrin.x86`` and ``tensor_intrin.arm_cpu`` (0.5 s) without running the package ``__init__`` that pulls
  in CUDA (35 s). GPU targets still import the whole package.

Measurements backing the choice (benchmarks/tune_throughput.py, one 128x384x1536 matmul task, 2026-11-26, this
2-core machine; BENCHMARKS.md "Auto-tuning throughput"): the stock LocalBuilder made 0 valid trials of 4 in 113 s
(every build timed out); at load ~3.4 the persistent pool made 98.7 valid trials/min and the in-process builder
81.5; at load 7-11 the in-process builder did better (34.0 vs 21.6/min), a second worker buying nothing there.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import types

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

_INTRIN_PKG = "tvm.s_tir.tensor_intrin"


def _lazy_intrin_package() -> types.ModuleType:
    """Put a lazy stand-in for ``tvm.s_tir.tensor_intrin`` in ``sys.modules`` (or return the loaded package).

    The real package ``__init__`` imports every target's intrinsics, CUDA's first (35 s here). The stand-in has
    the same ``__path__``, so ``import tvm.s_tir.tensor_intrin.x86`` (or ``.cuda``) loads just that file, and a
    plain ``import tvm.s_tir.tensor_intrin`` (which ``ms.TuneContext`` does on every construction) costs nothing.
    Attribute access (``tensor_intrin.cuda``) imports the submodule on demand.
    """
    mod = sys.modules.get(_INTRIN_PKG)
    if mod is not None:
        return mod
    import tvm.s_tir as s_tir  # pylint: disable=import-outside-toplevel

    stub = types.ModuleType(_INTRIN_PKG, "tvm.s_tir.tensor_intrin, loaded lazily by ember (one target at a time)")
    stub.__path__ = [os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin")]
    subs = {f[:-3] for f in os.listdir(stub.__path__[0]) if f.endswith(".py") and not f.startswith("_")}

    def _getattr(name):
        if name in subs:
            return importlib.import_module(f"{_INTRIN_PKG}.{name}")
        raise AttributeError(name)

    stub.__getattr__ = _getattr
    sys.modules[_INTRIN_PKG] = stub
    return stub


def register_cpu_intrinsics() -> None:
    """Register the CPU tensor intrinsics (x86 VNNI/AMX, ARM dot products) without the 35 s CUDA ones."""
    _lazy_intrin_package()
    for name in ("x86", "arm_cpu"):
        importlib.import_module(f"{_INTRIN_PKG}.{name}")


def register_intrinsics(target: tvm.target.Target) -> None:
    """Register the tensor intrinsics MetaSchedule's rules for ``target`` look up by name (and nothing else)."""
    if target.kind.name in ("llvm", "c"):
        register_cpu_intrinsics()
        return
    _lazy_intrin_package()
    names = {"cuda": ("cuda",), "rocm": ("rocm",), "metal": ("metal",)}.get(target.kind.name, ("cuda", "rocm", "metal"))
    for name in names:
        importlib.import_module(f"{_INTRIN_PKG}.{name}")


def build_and_export(mod: tvm.IRModule, target: tvm.target.Target, fmt: str = "so") -> str:
    """Compile one scheduled candidate and write it where a runner can load it (path returned).

    fmt "so": linked here, in the (parallel) build worker, so the (serial) local runner only dlopens it.
    fmt "tar": object files, linked by the device that loads them (RPC devices may be another architecture)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # pylint: disable=import-outside-toplevel

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    # Inside ``with target``: TVM's CUDA compile callback reads the arch (sm_90a) from the current target; without
    # one it asks the GPU of the build machine, or fails where there is none.
    with target:
        rt_mod = tvm.driver.build(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="ember-ms-"), f"kernel.{fmt}")
    if fmt == "tar":
        from tvm.support.tar import tar  # pylint: disable=import-outside-toplevel

        rt_mod.export_library(path, fcompile=tar)
    else:
        rt_mod.export_library(path)
    return path


def _worker_ready() -> None:
    """Pool initializer: import what a build needs once, so the first build's time is the build's."""
    import tvm.driver  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def _worker_ready_pause() -> None:
    # Long enough that the pool's threads (one worker process each) are all busy at once during warm-up.
    import time  # pylint: disable=import-outside-toplevel

    time.sleep(0.5)


@derived_object
class PersistentBuilder(ms.builder.PyBuilder):
    """Builds candidates in a pool of worker processes created once and kept across batches."""

    def __init__(self, max_workers: int | None = None, timeout_sec: float = 60.0, recycle_after: int = 500,
                 fmt: str = "so"):
        super().__init__()
        self.fmt = fmt
        self.max_workers = max_workers or max(1, os.cpu_count() or 1)
        self.timeout_sec = timeout_sec
        self.recycle_after = recycle_after
        self._pool = None
        self.built = 0

    def _get_pool(self) -> PopenPoolExecutor:
        if self._pool is None:
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec,
                                           initializer=_worker_ready, maximum_process_uses=self.recycle_after)
        return self._pool

    def warm_up(self) -> None:
        """Start every worker now, in the background (each pays its one ``import tvm`` while the caller goes on
        preparing the model), instead of one by one as the first batches arrive."""
        pool = self._get_pool()
        for _ in range(self.max_workers):
            pool.submit(_worker_ready_pause)

    def build(self, build_inputs):
        pool = self._get_pool()
        results = []
        for res in pool.map_with_error_catching(lambda x: build_and_export(*x),
                                                [(b.mod, b.target, self.fmt) for b in build_inputs]):
            if res.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"ember builder: timeout after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"ember builder: {res.value}"))
        self.built += len(build_inputs)
        return results

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates one by one in the tuning process (no workers; a codegen crash ends the run)."""

    def __init__(self, fmt: str = "so"):
        super().__init__()
        self.fmt = fmt
        self.built = 0

    def build(self, build_inputs):
        results = []
        for b in build_inputs:
            try:
                results.append(ms.builder.BuilderResult(build_and_export(b.mod, b.target, self.fmt), None))
            except Exception as e:  # pylint: disable=broad-except
                results.append(ms.builder.BuilderResult(None, f"ember builder: {type(e).__name__}: {e}"))
        self.built += len(build_inputs)
        return results

    def shutdown(self) -> None:
        pass


def remove_artifact(path: str) -> None:
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


__all__ = ["PersistentBuilder", "InProcessBuilder", "register_intrinsics", "register_cpu_intrinsics",
           "build_and_export"]
