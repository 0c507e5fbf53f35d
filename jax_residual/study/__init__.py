"""Studies: `python -m jax_residual.study STUDY.toml` (docs/study.md).

spec.py (the TOML file -> Study), plan.py (every run, the learning-rate choice), runner.py
(training and scoring this worker's runs, resuming), multipliers.py (standard's curve, compute
multipliers, bootstrap intervals: pure numpy), report.py (tables and figures from the results).
"""
