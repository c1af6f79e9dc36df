"""Scoring a found circuit against one planted in the model (the organism records its own)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from circuitfind.config.choices import LAST
from circuitfind.model.space import ComponentSpace


def planted_scores(model: torch.nn.Module, found: List[str], space: ComponentSpace) -> Dict[str, Any] | None:
    """Precision and recall of the found circuit against one planted in the model, if any.

    The planted circuit is heads and MLPs at the final position: in a space of heads and MLPs at
    several positions it is those units `@last`; other unit kinds are not compared."""
    meta = getattr(model.config, "circuitfind", None) or {}
    planted = meta.get("planted_circuit") if isinstance(meta, dict) else None
    if not planted or space.kind != "heads_mlps" or LAST not in space.positions:
        return None
    planted = [u.name for u in space.index([f"{name}@{LAST}" for name in planted], "the planted circuit")]
    hits = len(set(found) & set(planted))
    return {
        "planted": list(planted),
        "precision": hits / len(found) if found else 0.0,
        "recall": hits / len(planted),
        "exact": set(found) == set(planted),
    }
