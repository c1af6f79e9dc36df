"""Baseline methods: rank the components, keep the top k.

Every baseline scores each component by how much patching it (alone, or to first order)
improves the desiderata objective on the training pairs, sum_terms weight * loss; higher
is better, and components are ranked by this *signed* score. The circuit of size k is
the top k.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

from circuitfind.methods.objective import Objective, objective_of_masks, objective_value
from circuitfind.model.engine import Engine


def single_masks(shape: tuple[int, int], device) -> torch.Tensor:
    """One mask per component, patching that component alone. (L*(H+1), L, H+1)"""
    n = shape[0] * shape[1]
    return (1 - torch.eye(n, device=device)).view(n, *shape)


def single_patch_scores(engine: Engine, objectives: Sequence[Objective], device) -> torch.Tensor:
    """Improvement of the objective when each component alone is patched. (L, H+1)"""
    shape = engine.space.shape
    ones = torch.ones(1, *shape, device=device)
    base = objective_of_masks(engine, objectives, ones)[0]
    return (base - objective_of_masks(engine, objectives, single_masks(shape, device))).view(shape)


def attribution_scores(engine: Engine, objectives: Sequence[Objective], device) -> torch.Tensor:
    """First-order estimate of the same improvement, from one backward pass at w = 1.

    d objective / d w_i is the gradient at the component's output times (base - alternate),
    and patching moves w_i from 1 to 0, so the estimated improvement is the gradient itself.
    A loss quadratic in the effect (OI's: `Desideratum.flat_when_unpatched`) has gradient zero at w = 1,
    where the effect is zero: attribution sees only the other terms, and those terms' passes are left out.
    """
    mask = torch.ones(1, *engine.space.shape, device=device, requires_grad=True)
    sloped = [obj for obj in objectives if not obj.desideratum.flat_when_unpatched]
    if not sloped:
        return torch.zeros(engine.space.shape, device=device)
    objective_value(engine, sloped, mask).sum().backward()
    return mask.grad[0].detach()


def random_scores(engine: Engine, objectives: Sequence[Objective], device, seed: int) -> torch.Tensor:
    """Random scores, drawn from `seed` (the floor every ranking must beat). (L, H+1)"""
    return torch.rand(engine.space.shape, generator=torch.Generator().manual_seed(seed)).to(device)


# Keyed by config.choices.RANKING_METHODS; each takes (engine, objectives, device, seed).
SCORERS: Dict[str, Callable[..., torch.Tensor]] = {
    "single_patch": lambda engine, objectives, device, seed: single_patch_scores(engine, objectives, device),
    "attribution": lambda engine, objectives, device, seed: attribution_scores(engine, objectives, device),
    "random": random_scores,
}


def component_scores(method: str, engine: Engine, objectives, device, seed: int) -> torch.Tensor:
    """Scores of every component by a ranking method (higher = patch first). (L, H+1)"""
    return SCORERS[method](engine, objectives, device, seed)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Binary mask patching the k best-scored components (0 = patched). (L, H+1) -> (L, H+1)"""
    mask = torch.ones(scores.numel(), device=scores.device)
    mask[ranking(scores)[:k]] = 0
    return mask.view(scores.shape)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Flat component indices, best first."""
    return scores.flatten().argsort(descending=True, stable=True)
