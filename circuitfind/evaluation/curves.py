"""Faithfulness curves: held-out metrics against the number of components patched.

In the style of MIB's circuit-localisation metrics: for a ranking of the components
(best first, by *signed* score), patch the top n for n = 0, 1, 2, 5, 10, 20, 50, 100, ...,
all, and measure VD/OI accuracy and the normalised logit difference on held-out pairs. The
area under each curve is taken over the fraction of components patched (x in [0, 1]).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from circuitfind.evaluation.heldout import EvalSplit, evaluate_masks
from circuitfind.model.masks import masks_of

METRICS = ("acc", "logit_diff_norm")


def curve_sizes(n_components: int) -> List[int]:
    """0, 1, 2, 5, 10, 20, 50, ... below n_components, then all of them."""
    sizes, base = [0], 1
    while base < n_components:
        sizes += [s for s in (base, 2 * base, 5 * base) if s < n_components]
        base *= 10
    return sizes + [n_components]


def prefix_masks(order: torch.Tensor, sizes: Sequence[int], shape: tuple[int, int]) -> torch.Tensor:
    """Masks patching the first n components of `order`, one per n. (len(sizes), L, H+1)"""
    return masks_of([order[:n].tolist() for n in sizes], shape)


@torch.no_grad()
def faithfulness_curve(order: torch.Tensor, splits: Sequence[EvalSplit], engine, chunk: int = 16) -> Dict[str, object]:
    """Held-out metrics of the top-n masks of a ranking, and the area under each curve."""
    shape = engine.space.shape
    n_components = engine.space.n_components
    sizes = curve_sizes(n_components)
    masks = prefix_masks(order.cpu(), sizes, shape).to(order.device)
    curve: Dict[str, List[float]] = {}
    for split in splits:
        parts = [evaluate_masks(split, engine, m) for m in masks.split(chunk)]
        for metric in METRICS:
            curve[split.key(metric)] = torch.cat([p[metric] for p in parts]).tolist()
    x = np.array(sizes, dtype=float) / n_components
    auc = {key: float(np.trapezoid(values, x)) for key, values in curve.items()}
    return {"sizes": sizes, "curve": curve, "auc": auc, "ranked_by": "signed score"}
