"""How many worker threads TVM's CPU runtime uses for ember's parallel kernels.

TVM's thread pool sizes itself from ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) and otherwise takes
``std::thread::hardware_concurrency() / 2`` on x86-64, assuming every core has two hyper-threads. On a machine
without SMT -- most cloud VMs expose one thread per core, like the 2-core Xeon ember is benchmarked on -- that
halves the cores a kernel may use: with 2 cores TVM ran every "parallel" loop on 1 thread (MiniLM batch 1: 34.6
ms on 1 thread vs 18.6 ms on 2, same artifact, quiet machine), while PyTorch and ONNX Runtime used both.

:func:`configure` therefore sets ``TVM_NUM_THREADS`` to the number of *physical* cores this process may run on
(its CPU affinity, SMT siblings counted once), unless the user already chose ``TVM_NUM_THREADS`` or
``OMP_NUM_THREADS``. It only sets an environment variable, and TVM reads it when a thread first launches parallel
work, so it must run before that: ``import ember`` calls it. A thread whose TVM pool already exists keeps its
size (still correct, just not wider).
"""

from __future__ import annotations

import os

_ENV = "TVM_NUM_THREADS"


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows: no affinity API
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores among ``cpus`` (default: this process's affinity): logical CPUs that share a core
    (SMT siblings, same package and core id in sysfs) count once. Without sysfs topology every CPU counts."""
    cpus = _affinity() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = os.path.join(sysfs, f"cpu{cpu}", "topology")
        try:
            with open(os.path.join(topo, "physical_package_id"), encoding="ascii") as f:
                pkg = f.read().strip()
            with open(os.path.join(topo, "core_id"), encoding="ascii") as f:
                core = f.read().strip()
        except OSError:
            return max(len(cpus), 1)
        cores.add((pkg, core))
    return max(len(cores), 1)


def configure(environ=None) -> int | None:
    """Set ``TVM_NUM_THREADS`` to the physical core count unless the user set it (or ``OMP_NUM_THREADS``).
    Returns the count it set, or None when it left the environment alone."""
    environ = os.environ if environ is None else environ
    if environ.get(_ENV) or environ.get("OMP_NUM_THREADS"):
        return None
    n = physical_cores()
    environ[_ENV] = str(n)
    return n


__all__ = ["configure", "physical_cores"]
