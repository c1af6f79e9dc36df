"""Scoring a found circuit against a known one: planted in the model, or read off a compiled program's graph.

Two kinds of ground truth:
- planted: heads and MLPs at one position, recorded by the model (the organism records its own), the
  final token unless it says another (`planted_position`). In a space of heads and MLPs at several
  positions it is those units at that position; a space without that position, or of other unit
  kinds, is not compared.
- a compiled tracr program (model/tracr_truth.py): the smallest sets of the run's units that cut every
  path from the tokens the desiderata vary (those where a pair's base and alternate differ) to the
  output. Where there is more than one, the found circuit is scored against the nearest, and the record
  says why the truth is not unique.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from circuitfind.config.choices import LAST
from circuitfind.model.space import ComponentSpace
from circuitfind.task.encoding import PairEncoder
from circuitfind.task.pairs import Pair


@dataclass
class Truth:
    """The known circuit(s) of a run's space: one, or several equally small ones and why."""

    circuits: List[List[str]]  # unit names of the space
    why: Optional[str] = None  # from a graph: why there is not exactly one circuit
    on_paths: Optional[List[str]] = None  # from a graph: every unit on a path from a varied token to the output


def planted_truth(
    model: torch.nn.Module, space: ComponentSpace, encoder: PairEncoder, pairs: Sequence[Pair]
) -> Truth | None:
    """The run's ground truth, if the model has one: from its compiled graph for the tokens `pairs` vary
    (the pairs of the desiderata that follow the alternate), or the circuit planted in it."""
    if space.kind != "heads_mlps":
        return None
    if hasattr(model, "graph_truth"):
        return graph_truth_of(model, space, encoder, pairs)
    meta = getattr(model.config, "circuitfind", None) or {}
    planted = meta.get("planted_circuit") if isinstance(meta, dict) else None
    position = meta.get("planted_position", LAST) if isinstance(meta, dict) else LAST
    if not planted or position not in space.positions:
        return None
    return Truth([[u.name for u in space.index([f"{name}@{position}" for name in planted], "the planted circuit")]])


def graph_truth_of(model, space: ComponentSpace, encoder: PairEncoder, pairs: Sequence[Pair]) -> Truth | None:
    """The smallest cuts of the model's graph between the varied tokens and the output, as the space's units;
    None when the pairs' prompts differ in length (tokens are not aligned) or nothing varies."""
    if not pairs:
        return None
    ids = [(encoder.ids(p.base.text), encoder.ids(p.alt.text)) for p in pairs]
    lengths = {len(t) for pair in ids for t in pair}
    if len(lengths) != 1:
        return None
    (length,) = lengths
    varied = {i for base, alt in ids for i in range(length) if base[i] != alt[i]}
    if not varied:
        return None
    if encoder.finder is None:
        positions = {LAST: [length - 1]}
    else:
        found = encoder.finder.tokens(pairs[0].base)[1]
        positions = {name: found[name] for name in space.positions}
    truth = model.graph_truth(length, varied, positions)

    def names(units: Sequence[str]) -> List[str]:  # `L0.H0@last` as the space writes it (`L0.H0` at the final token)
        return [u.name for u in space.index(units, "the ground truth")]

    return Truth([names(c) for c in truth.circuits], truth.why, names(truth.on_paths))


def planted_scores(truth: Truth | None, found: List[str]) -> Dict[str, Any] | None:
    """Precision and recall of the found circuit against the truth (its nearest circuit when there are
    several: most units in common, then the smallest); a graph's truth with no circuit says why instead."""
    if truth is None:
        return None
    if not truth.circuits:
        return {
            "planted": None,
            "precision": None,
            "recall": None,
            "exact": False,
            "unique": False,
            "circuits": [],
            "why": truth.why,
            "on_paths": truth.on_paths,
        }
    found_set = set(found)
    nearest = max(truth.circuits, key=lambda c: (len(found_set & set(c)), -len(c)))
    hits = len(found_set & set(nearest))
    scores: Dict[str, Any] = {
        "planted": list(nearest),
        "precision": hits / len(found) if found else 0.0,
        "recall": hits / len(nearest),
        "exact": found_set == set(nearest),
    }
    if truth.on_paths is not None:
        scores |= {
            "unique": len(truth.circuits) == 1,
            "circuits": truth.circuits,
            "why": truth.why,
            "on_paths": truth.on_paths,
        }
    return scores
