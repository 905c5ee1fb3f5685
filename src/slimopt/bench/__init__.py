"""Benchmarks: ``compare`` (every preset on one budget), ``report`` (its tables and plots),
``baselines`` (optional optimizers from other packages), memory and step-time profiles.

Submodules are imported on use, so the library never pays for the harness or matplotlib.
"""
