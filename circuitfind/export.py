"""A circuit in the forms peers read: MIB submission JSON and TransformerLens hook names."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import torch

from circuitfind.components import ComponentLayout
from circuitfind.outputs import write_json

# MIB's circuit-localisation track takes either importance scores or binary circuits with at
# most these percentages of the model's components.
MIB_PERCENTAGES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)


def mib_node(layer: int, col: int, layout: ComponentLayout) -> str:
    """MIB's node names: attention head `a{l}.h{h}`, MLP `m{l}`."""
    return f"m{layer}" if col == layout.n_heads else f"a{layer}.h{col}"


def transformerlens_hook(layer: int, col: int, layout: ComponentLayout) -> Dict[str, Any]:
    """The TransformerLens hook that carries a component: head outputs before W_O, or MLP out."""
    if col == layout.n_heads:
        return {"hook": f"blocks.{layer}.hook_mlp_out", "head": None}
    return {"hook": f"blocks.{layer}.attn.hook_z", "head": col}


def mib_circuit(scores: torch.Tensor, in_graph: torch.Tensor, layout: ComponentLayout, d_model: int) -> Dict[str, Any]:
    """MIB node-level JSON: every head and MLP with its score and circuit membership. (L, H+1)"""
    nodes = {}
    for layer in range(layout.n_layers):
        for col in range(layout.n_heads + 1):
            nodes[mib_node(layer, col, layout)] = {
                "score": float(scores[layer, col]),
                "in_graph": bool(in_graph[layer, col]),
            }
    return {
        "cfg": {"n_layers": layout.n_layers, "n_heads": layout.n_heads, "parallel_attn_mlp": False, "d_model": d_model},
        "level": "node",
        "position": "final token",
        "nodes": nodes,
    }


def export_circuit(
    out_dir: Path, mask: torch.Tensor, rounded: torch.Tensor, layout: ComponentLayout, d_model: int
) -> List[str]:
    """Write mib/importances.json, mib/circuit_{p}pct.json and transformerlens.json. Returns the paths."""
    mask, rounded = mask.detach().cpu(), rounded.detach().cpu()
    scores = 1 - mask  # importance: 1 = fully patched
    written = []
    path = out_dir / "mib" / "importances.json"
    write_json(path, mib_circuit(scores, rounded == 0, layout, d_model))
    written.append(path)
    order = scores.flatten().argsort(descending=True, stable=True)
    for pct in MIB_PERCENTAGES:
        k = math.floor(layout.n_components * pct / 100)
        member = torch.zeros(layout.n_components, dtype=torch.bool)
        member[order[:k]] = True
        path = out_dir / "mib" / f"circuit_{pct:g}pct.json"
        write_json(path, mib_circuit(scores, member.view(mask.shape), layout, d_model))
        written.append(path)
    hooks = [
        {"name": name, **transformerlens_hook(layer, col, layout)}
        for (layer, col), name in zip(
            ((layer, col) for layer in range(layout.n_layers) for col in range(layout.n_heads + 1)), layout.names()
        )
        if rounded[layer, col] == 0
    ]
    path = out_dir / "transformerlens.json"
    write_json(path, {"circuit": hooks, "note": "patch these hooks at the final position only"})
    written.append(path)
    return written
