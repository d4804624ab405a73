"""Benchmarks of hpsearch against hand-written Optuna scripts; `python -m benchmarks.run` runs the suite."""
