"""Runtime side of ember: loads artifacts and runs them with TVM's runtime only (no compiler, no torch)."""

from .module import BenchmarkResult, CompiledModel

__all__ = ["CompiledModel", "BenchmarkResult"]
