"""Scoring a found circuit against one planted in the model (the organism records its own)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from circuitfind.config.choices import LAST
from circuitfind.model.space import ComponentSpace


def planted_scores(model: torch.nn.Module, found: List[str], space: ComponentSpace) -> Dict[str, Any] | None:
    """Precision and recall of the found circuit against one planted in the model, if any.

    The planted circuit is heads and MLPs at one position (the final token unless the model says
    another, `planted_position`): in a space of heads and MLPs at several positions it is those units
    at that position; a space without that position, or of other unit kinds, is not compared."""
    meta = getattr(model.config, "circuitfind", None) or {}
    planted = meta.get("planted_circuit") if isinstance(meta, dict) else None
    position = meta.get("planted_position", LAST) if isinstance(meta, dict) else LAST
    if not planted or space.kind != "heads_mlps" or position not in space.positions:
        return None
    planted = [u.name for u in space.index([f"{name}@{position}" for name in planted], "the planted circuit")]
    hits = len(set(found) & set(planted))
    return {
        "planted": list(planted),
        "precision": hits / len(found) if found else 0.0,
        "recall": hits / len(planted),
        "exact": set(found) == set(planted),
    }
