"""Desiderata: causal properties the circuit must have (one module each).

A desideratum says how to build an alternate for a base prompt, which answer the patched
model should give, and the loss that pushes it there. Adding one is one module here plus
one YAML in `configs/desiderata/`.
"""

from circuitfind.desiderata import oi, vd  # noqa: F401  (registers them)
from circuitfind.desiderata.base import DESIDERATA, Desideratum, get_desideratum, register

__all__ = ["DESIDERATA", "Desideratum", "get_desideratum", "register"]
