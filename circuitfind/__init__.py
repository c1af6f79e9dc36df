"""circuitfind: find the circuit that performs a subtask, from causal desiderata."""

__version__ = "0.1.0"
