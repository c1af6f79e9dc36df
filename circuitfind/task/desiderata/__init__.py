"""Desiderata: causal properties the circuit must have (one module each).

A desideratum says how to build an alternate for a base prompt, which answer the patched
model should give, and the loss that pushes it there. Adding one is one module here (found
and registered on import) plus one YAML in `configs/desiderata/` that names it.
"""

import importlib
import pkgutil

from circuitfind.task.desiderata.base import DESIDERATA, Desideratum, get_desideratum, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # each module registers its desideratum

__all__ = ["DESIDERATA", "Desideratum", "get_desideratum", "register"]
