"""Helpers every benchmark script shares: the machine's name and fair timing under a drifting load.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they import it as
``benchtools``.
"""

from __future__ import annotations

import platform
import time


def cpu_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_times(fns: dict, rounds: int, per_round: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds per call of each function, the functions taking turns round by round.

    On a shared machine the load changes from second to second; taking turns gives every engine the same mix of
    quiet and busy moments, so the ratios between engines stay meaningful even when the absolute times swing.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times
