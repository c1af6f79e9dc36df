"""circuitfind: find the circuit that performs a subtask, from causal desiderata."""

from circuitfind.version import __version__

__all__ = ["__version__", "find_circuit", "evaluate_circuit"]


def find_circuit(*overrides: str, run_dir=None):
    """Run one search from Python, as `circuitfind train <overrides>`; returns its records (circuitfind.api)."""
    from circuitfind.api import find_circuit as run  # torch and transformers only when called

    return run(*overrides, run_dir=run_dir)


def evaluate_circuit(*overrides: str, circuit=None, run=None, out_dir=None):
    """Test a circuit from Python, as `circuitfind eval`; returns eval.json's contents (circuitfind.api)."""
    from circuitfind.api import evaluate_circuit as evaluate

    return evaluate(*overrides, circuit=circuit, run=run, out_dir=out_dir)
