"""The package's layers: no import cycle anywhere (lazy imports included), and no import upwards.

The layer order is the import-linter contract in pyproject.toml ([tool.importlinter]); `lint-imports`
checks the same contract from the command line. grimp (import-linter's graph) reads every import
statement, at module level or inside a function, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import grimp
import pytest

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def contract_layers() -> List[Set[str]]:
    """The layers of the pyproject contract, top first; `a | b` are independent siblings."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [{name.strip() for name in layer.split("|")} for layer in contract["layers"]]


def layer_violations(graph: grimp.ImportGraph) -> List[str]:
    """Every import that goes up the layers or between siblings, as `importer -> imported`."""
    found = graph.find_illegal_dependencies_for_layers(layers=contract_layers())
    return sorted(f"{d.importer} -> {d.imported}" for d in found)


def cycles(graph: grimp.ImportGraph) -> List[List[str]]:
    """The import cycles between modules: strongly connected components of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph.modules)))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("circuitfind")


def test_no_import_goes_up_a_layer(graph):
    assert not layer_violations(graph)


def test_no_import_cycle_even_through_lazy_imports(graph):
    assert not cycles(graph)


def test_a_new_cycle_or_upward_import_is_caught():
    # The evaluation layer reaching up into runs (which imports it back): both checks must fail.
    graph = grimp.build_graph("circuitfind")
    graph.add_import(importer="circuitfind.evaluation.heldout", imported="circuitfind.runs.job")
    assert layer_violations(graph) == ["circuitfind.evaluation -> circuitfind.runs"]
    assert any({"circuitfind.evaluation.heldout", "circuitfind.runs.job"} <= set(c) for c in cycles(graph))


def test_a_cycle_inside_one_layer_is_caught():
    inner = grimp.build_graph("circuitfind")
    inner.add_import(importer="circuitfind.model.space", imported="circuitfind.model.engine")  # engine imports space
    assert not layer_violations(inner)  # one layer: the contract alone would not see it
    assert any({"circuitfind.model.space", "circuitfind.model.engine"} <= set(c) for c in cycles(inner))


def test_every_module_belongs_to_a_layer(graph):
    layers = set().union(*contract_layers())
    top = {".".join(m.split(".")[:2]) for m in graph.modules if m != "circuitfind"}
    assert top <= layers | {"circuitfind.configs", "circuitfind.assets"}, top - layers


def test_lint_imports_keeps_the_contract():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:]
