"""A compiled program's ground truth for one desideratum: the smallest sets of units whose patching
carries the change of the varied tokens to the output, read off tracr's graph (no model is run).

Patching a unit at a position writes the alternate's value of the RASP node it implements there. The
inputs a base and its alternate share give the same values in both runs, so the patched output is the
alternate's exactly when every path from a varied token to the output at the final position passes
through a patched unit: the truth is the smallest such cuts, among the run's units (its positions).

The graph is expanded over positions: a Map or SequenceMap at position q reads its inputs at q; an
Aggregate or SelectorWidth at q reads its queries at q and its keys (and an Aggregate's values) at every
position; a node of two units (a SelectorWidth: its head, then its MLP) is the two in series. An MLP
that implements several nodes cuts them all. The smallest cuts are found by trying every set of the units
on some path, smallest first. Where there is more than one, `why` says so: units in series carry the same
change, so patching any one of them is enough, and no search can tell which the truth is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

MAX_SETS = 200_000  # sets of units tried before giving up (a graph of 17 units on paths has 131,072)

Vertex = Tuple[str, int, int]  # (RASP node, its unit's place in the node, token position)


@dataclass
class GraphTruth:
    """The smallest cuts (unit names `L1.H0@last`), and every unit that lies on a path at all."""

    circuits: List[List[str]]
    on_paths: List[str]
    why: Optional[str] = None  # set when there is not exactly one smallest cut


def graph_truth(
    graph: Dict[str, Dict], output: str, length: int, varied: Set[int], positions: Dict[str, Sequence[int]]
) -> GraphTruth:
    """The smallest sets of units at `positions` (name -> token indices) that cut every path from the tokens
    at `varied` (indices) to `output` at the last of `length` tokens."""
    parts = {label: max(len(node["units"]), 1) for label, node in graph.items()}
    readers = _readers(graph)
    sink: Vertex = (output, parts[output] - 1, length - 1)
    sources = [("tokens", 0, p) for p in sorted(varied)]
    cutters = _cutters(graph, positions)  # unit@position -> the vertices it patches
    forward = _reach(sources, lambda v: _next(v, parts, readers, length))
    backward = _reach([sink], lambda v: _previous(v, graph, parts, length))
    on_path = forward & backward
    candidates = sorted(u for u, vs in cutters.items() if vs & on_path)
    if sink not in forward:
        return GraphTruth([], [], why="no path leads from the varied tokens to the output: nothing can carry a change")
    cuts: List[FrozenSet[str]] = []
    tried = 0
    for size in range(1, len(candidates) + 1):
        tried += math.comb(len(candidates), size)
        if tried > MAX_SETS:
            return GraphTruth([], candidates, why=f"more than {MAX_SETS} sets of units to try")
        for chosen in itertools.combinations(candidates, size):
            blocked = set().union(*(cutters[u] for u in chosen))
            if sink not in _reach([s for s in sources if s not in blocked], _avoiding(blocked, parts, readers, length)):
                cuts.append(frozenset(chosen))
        if cuts:
            break
    circuits = [sorted(c) for c in sorted(cuts, key=sorted)]
    return GraphTruth(circuits, candidates, why=_why(circuits))


def depends_on(graph: Dict[str, Dict], output: str) -> Set[str]:
    """Every unit the output depends on at all, at any position: the units of each node reached walking
    back from the output through what each node reads."""
    seen, todo = set(), [output]
    while todo:
        label = todo.pop()
        if label not in seen:
            seen.add(label)
            todo += graph[label]["here"] + graph[label]["everywhere"]
    return {unit for label in seen for unit in graph[label]["units"]}


def _why(circuits: List[List[str]]) -> Optional[str]:
    if not circuits:
        return (
            "no set of these units cuts every path from the varied tokens to the output (the change reaches it "
            "through positions the run has no units at)"
        )
    if len(circuits) == 1:
        return None
    shown = " | ".join(", ".join(c) for c in circuits)
    return (
        f"{len(circuits)} smallest circuits of {len(circuits[0])} unit(s) each cut every path from the varied tokens "
        f"to the output ({shown}): units in series on one path carry the same change, so patching any one is enough"
    )


def _readers(graph: Dict[str, Dict]) -> Dict[str, List[Tuple[str, bool]]]:
    """node -> the nodes that read it, each with whether they read it at every position."""
    out: Dict[str, List[Tuple[str, bool]]] = {}
    for label, node in graph.items():
        for child in node["here"]:
            out.setdefault(child, []).append((label, False))
        for child in node["everywhere"]:
            out.setdefault(child, []).append((label, True))
    return out


def _next(v: Vertex, parts, readers, length: int) -> List[Vertex]:
    label, part, pos = v
    if part + 1 < parts[label]:
        return [(label, part + 1, pos)]
    out = []
    for reader, everywhere in readers.get(label, []):
        out += [(reader, 0, q) for q in range(length)] if everywhere else [(reader, 0, pos)]
    return out


def _previous(v: Vertex, graph: Dict[str, Dict], parts, length: int) -> List[Vertex]:
    label, part, pos = v
    if part > 0:
        return [(label, part - 1, pos)]
    node = graph[label]
    out = [(child, parts[child] - 1, pos) for child in node["here"]]
    return out + [(child, parts[child] - 1, k) for child in node["everywhere"] for k in range(length)]


def _avoiding(blocked: Set[Vertex], parts, readers, length: int):
    return lambda v: [w for w in _next(v, parts, readers, length) if w not in blocked]


def _reach(start: List[Vertex], step) -> Set[Vertex]:
    seen, todo = set(start), list(start)
    while todo:
        for w in step(todo.pop()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _cutters(graph: Dict[str, Dict], positions: Dict[str, Sequence[int]]) -> Dict[str, Set[Vertex]]:
    """unit@position -> the vertices patching it replaces (every node the unit implements, at those tokens)."""
    out: Dict[str, Set[Vertex]] = {}
    for label, node in graph.items():
        for part, unit in enumerate(node["units"]):
            for name, tokens in positions.items():
                out.setdefault(f"{unit}@{name}", set()).update((label, part, t) for t in tokens)
    return out
