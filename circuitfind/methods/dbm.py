"""The mask-training loop of desiderata-based masking, top to bottom (docs/method.md).

Each iteration, for each desideratum in order: clamp w to [0, 1], one Adam step on
weight * loss (+ lambda * l0.5 sparsity on the steps that carry it). After training: clamp
and round. K masks (one per lambda) are trained side by side; Adam is element-wise and each
mask's loss touches only its own weights, so this equals K separate runs.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from tqdm import tqdm

from circuitfind.errors import CircuitfindError
from circuitfind.methods.objective import Objective, loss_parts
from circuitfind.model.engine import Engine

OnStep = Callable[[int, torch.Tensor, Dict[str, torch.Tensor]], None]  # (step, masks (K, L, H+1), logs)


def sparsity(mask: torch.Tensor, eps: float) -> torch.Tensor:
    """The l0.5 penalty per mask: sum_i (1 + eps - w_i) ** 0.5. (K, L, H+1) -> (K,)"""
    return ((1 + eps - mask) ** 0.5).flatten(1).sum(dim=1)


class NonFiniteLoss(CircuitfindError):
    """The loss became NaN or inf; `last_good` holds the mask before the failing step."""

    def __init__(self, message: str, last_good: torch.Tensor):
        super().__init__(message)
        self.last_good = last_good


def train_mask(
    engine: Engine,
    objectives: Sequence[Objective],
    lams: torch.Tensor,
    optimizer,
    on_step: OnStep | None = None,
    progress: bool = True,
    desc: str = "mask",
) -> torch.Tensor:
    """Learn K continuous masks (w = 1: keep, w = 0: patch), one per lambda. Returns (K, L, H+1), clamped.

    `optimizer` is the optimizer config (lr, steps, eps: the 1.001 of the l0.5 penalty); `desc`
    labels the progress bar.
    """
    k = lams.shape[0]
    mask = torch.ones(k, *engine.space.shape, device=lams.device, requires_grad=True)
    opt = torch.optim.Adam([mask], lr=optimizer.lr)
    for step in tqdm(range(optimizer.steps), desc=desc, disable=not progress, leave=False):
        logs: Dict[str, torch.Tensor] = {}
        for obj in objectives:
            with torch.no_grad():
                mask.clamp_(0, 1)
            last_good = mask.detach().clone()
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros(k, device=lams.device)
            for part in loss_parts(engine, obj, mask):
                (obj.weight * part).sum().backward()
                loss_sum = loss_sum + part.detach()
            loss = obj.weight * loss_sum
            if obj.with_sparsity:
                penalty = lams * sparsity(mask, optimizer.eps)
                penalty.sum().backward()
                logs["sparsity"] = penalty.detach()
                loss = loss + penalty.detach()
            if not (torch.isfinite(loss).all() and torch.isfinite(mask.grad).all()):
                raise NonFiniteLoss(
                    f"the {obj.desideratum.name} loss or its gradient became non-finite at step {step}; "
                    "the last good mask is kept; lower optimizer.lr or check the model's dtype",
                    last_good,
                )
            logs[f"{obj.desideratum.name}_loss"] = loss_sum
            opt.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
            logs["n_patched"] = (mask < 0.5).flatten(1).sum(dim=1).float()
        if on_step is not None:
            on_step(step, mask.detach(), logs)
    return mask.detach().clamp(0, 1)


def round_mask(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask: 1 keeps a component, 0 patches it (w < 0.5)."""
    return (mask >= 0.5).to(mask.dtype)
