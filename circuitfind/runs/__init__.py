"""Runs: a config made into a job, and the `train`, `eval` and `optimum` runs built on it."""
