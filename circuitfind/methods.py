"""How a circuit is chosen: DBM's trained mask, or a baseline that ranks components.

Every baseline scores each component by how much patching it (alone, or to first order)
improves the desiderata objective on the training pairs, sum_terms weight * loss; higher
is better, and components are ranked by this *signed* score. The circuit of size k is
the top k.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from circuitfind.engine import FullEngine, Readout
from circuitfind.train_loop import Objective, patched_delta

MASK_CHUNK = 64  # masks evaluated together when scoring many candidate masks


def objective_value(
    engine: FullEngine, readout: Readout, objectives: Sequence[Objective], mask: torch.Tensor
) -> torch.Tensor:
    """The desiderata objective (no sparsity term) of each of K masks. (K, L, H+1) -> (K,)"""
    total = torch.zeros(mask.shape[0], device=mask.device)
    for obj in objectives:
        for prep, d0 in zip(obj.batches, obj.d0):
            share = len(prep.pairs) / obj.n_pairs
            loss = obj.desideratum.loss(patched_delta(engine, readout, prep, d0, mask))
            total = total + obj.weight * share * loss.to(total.device)
    return total


@torch.no_grad()
def objective_of_masks(engine, readout, objectives, masks: torch.Tensor, chunk: int = MASK_CHUNK) -> torch.Tensor:
    """objective_value over many masks, `chunk` at a time. (N, L, H+1) -> (N,)"""
    return torch.cat([objective_value(engine, readout, objectives, m) for m in masks.split(chunk)])


def single_masks(shape: tuple[int, int], device) -> torch.Tensor:
    """One mask per component, patching that component alone. (L*(H+1), L, H+1)"""
    n = shape[0] * shape[1]
    return (1 - torch.eye(n, device=device)).view(n, *shape)


def single_patch_scores(engine, readout, objectives, shape, device) -> torch.Tensor:
    """Improvement of the objective when each component alone is patched. (L, H+1)"""
    ones = torch.ones(1, *shape, device=device)
    base = objective_of_masks(engine, readout, objectives, ones)[0]
    return (base - objective_of_masks(engine, readout, objectives, single_masks(shape, device))).view(shape)


def attribution_scores(engine, readout, objectives, shape, device) -> torch.Tensor:
    """First-order estimate of the same improvement, from one backward pass at w = 1.

    d objective / d w_i is the gradient at the component's output times (base - alternate),
    and patching moves w_i from 1 to 0, so the estimated improvement is the gradient itself.
    (The OI loss is quadratic in the effect, so its gradient at w = 1 is zero: attribution
    sees only the VD side.)
    """
    mask = torch.ones(1, *shape, device=device, requires_grad=True)
    objective_value(engine, readout, objectives, mask).sum().backward()
    return mask.grad[0].detach()


def random_scores(shape, device, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(device)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Binary mask patching the k best-scored components (0 = patched). (L, H+1) -> (L, H+1)"""
    mask = torch.ones(scores.numel(), device=scores.device)
    mask[scores.flatten().argsort(descending=True, stable=True)[:k]] = 0
    return mask.view(scores.shape)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Flat component indices, best first."""
    return scores.flatten().argsort(descending=True, stable=True)


SCORERS: Dict[str, Callable] = {
    "single_patch": single_patch_scores,
    "attribution": attribution_scores,
}
BASELINES: List[str] = ["single_patch", "attribution", "random"]
METHODS: List[str] = ["dbm", *BASELINES]
