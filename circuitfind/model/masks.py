"""Masks over the unit space from sets of units (kept out of space.py, which the CLI reads before torch loads)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def masks_of(circuits: Sequence[Iterable[int]], shape: tuple[int, int], device=None) -> torch.Tensor:
    """One mask per circuit: its units (flat indices, as `ComponentSpace.flat` gives them) patched (0),
    the rest kept (1). (N, L, n_cols)"""
    masks = torch.ones(len(circuits), shape[0] * shape[1], device=device)
    for i, units in enumerate(circuits):
        masks[i, list(units)] = 0
    return masks.view(len(circuits), *shape)
