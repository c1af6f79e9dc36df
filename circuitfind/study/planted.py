"""Scoring a found circuit against one planted in the model (the organism records its own)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch


def planted_scores(model: torch.nn.Module, found: List[str]) -> Dict[str, Any] | None:
    """Precision and recall of the found circuit against one planted in the model, if any."""
    meta = getattr(model.config, "circuitfind", None) or {}
    planted = meta.get("planted_circuit") if isinstance(meta, dict) else None
    if not planted:
        return None
    hits = len(set(found) & set(planted))
    return {
        "planted": list(planted),
        "precision": hits / len(found) if found else 0.0,
        "recall": hits / len(planted),
        "exact": set(found) == set(planted),
    }
