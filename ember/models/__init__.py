"""Models ember ships with for demos, tests and benchmarks (weights come from installed packages, offline)."""
