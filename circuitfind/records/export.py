"""A circuit in the forms peers read: MIB submission JSON and TransformerLens hook names."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import torch

from circuitfind.model.space import ComponentSpace
from circuitfind.records.files import write_json

# MIB's circuit-localisation track takes either importance scores or binary circuits with at
# most these percentages of the model's components.
MIB_PERCENTAGES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)


def mib_circuit(scores: torch.Tensor, in_graph: torch.Tensor, space: ComponentSpace, d_model: int) -> Dict[str, Any]:
    """MIB node-level JSON: every unit with its score and circuit membership. (L, n_cols)

    MIB's own node names are final-position heads and MLPs; other unit spaces keep MIB's names
    with circuitfind's suffixes (`a2.h1@s2`, `m3[128:144]@last`, `r5@x`), listed in `cfg.units`."""
    nodes = {
        unit.mib_node: {"score": float(scores[unit.layer, unit.col]), "in_graph": bool(in_graph[unit.layer, unit.col])}
        for unit in space.units()
    }
    return {
        "cfg": {
            "n_layers": space.n_layers,
            "n_heads": space.n_heads,
            "parallel_attn_mlp": False,
            "d_model": d_model,
            **({} if space.is_default else {"units": space.facts()}),
        },
        "level": "node",
        "position": "final token" if space.is_default else "per node (@position)",
        "nodes": nodes,
    }


def export_circuit(
    out_dir: Path, scores: torch.Tensor, circuit: torch.Tensor, space: ComponentSpace, d_model: int
) -> List[str]:
    """Write mib/importances.json, mib/circuit_{p}pct.json and transformerlens.json. Returns the paths.

    scores (L, n_cols): the result's ranking, higher = more important; circuit (L, n_cols): 0 = in it."""
    scores, circuit = scores.detach().cpu().float(), circuit.detach().cpu()
    written = []
    path = out_dir / "mib" / "importances.json"
    write_json(path, mib_circuit(scores, circuit == 0, space, d_model))
    written.append(path)
    order = scores.flatten().argsort(descending=True, stable=True)
    for pct in MIB_PERCENTAGES:
        k = math.floor(space.n_components * pct / 100)
        member = torch.zeros(space.n_components, dtype=torch.bool)
        member[order[:k]] = True
        path = out_dir / "mib" / f"circuit_{pct:g}pct.json"
        write_json(path, mib_circuit(scores, member.view(circuit.shape), space, d_model))
        written.append(path)
    hooks = [
        {"name": unit.name, **unit.transformerlens} for unit in space.units() if circuit[unit.layer, unit.col] == 0
    ]
    path = out_dir / "transformerlens.json"
    note = "patch each hook at its position: `last` is the final token, a slot name the tokens of that slot"
    write_json(path, {"circuit": hooks, "note": note})
    written.append(path)
    return written
