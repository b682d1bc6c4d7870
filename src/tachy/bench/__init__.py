"""Benchmark harness: `tachy bench` (see runner.py)."""
