"""Benchmark scripts (run each as `python benchmarks/<name>.py`) and their shared timing helpers."""
