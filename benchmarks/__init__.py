"""The benchmarks: one entry point, ``python -m benchmarks`` (or ``python benchmarks/bench.py``); see bench.py."""
