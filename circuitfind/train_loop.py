"""The mask-training loop of desiderata-based masking, top to bottom (method.md).

Each iteration, for each desideratum in order: clamp w to [0, 1], one Adam step on
weight * loss (+ lambda * l0.5 sparsity on the steps that carry it). After training: clamp
and round. K masks (one per lambda) are trained side by side; Adam is element-wise and each
mask's loss touches only its own weights, so this equals K separate runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from tqdm import tqdm

from circuitfind.desiderata import Desideratum
from circuitfind.engine import FullEngine, Prepared, Readout
from circuitfind.errors import CircuitfindError


@dataclass
class Objective:
    """One desideratum's training pairs, prepared by the engine, and its step settings."""

    desideratum: Desideratum
    batches: List[Prepared]  # sub-batches of the training pairs
    d0: List[torch.Tensor]  # per sub-batch (B,): logit difference of the unpatched base run
    weight: float
    with_sparsity: bool

    @property
    def n_pairs(self) -> int:
        return sum(len(p.pairs) for p in self.batches)


def unpatched_logit_diff(engine: FullEngine, readout: Readout, prep: Prepared) -> torch.Tensor:
    """d0 = logit[alt answer] - logit[base answer] on the clean base run. (B,)"""
    with torch.no_grad():
        hidden = engine.clean_hidden(prep.pairs.base_ids, prep.pairs.base_attn)  # (B, hidden)
        return readout.logit_diff(hidden[None], prep.pairs.alt_answer, prep.pairs.base_answer)[0]


def patched_delta(
    engine: FullEngine, readout: Readout, prep: Prepared, d0: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """d(patched) - d0 for each mask. mask (K, L, H+1) -> (K, B)"""
    hidden = engine.final_hidden(prep, mask)  # (K, B, hidden)
    d = readout.logit_diff(hidden, prep.pairs.alt_answer, prep.pairs.base_answer)
    return d - d0.to(d.device)


def sparsity(mask: torch.Tensor, eps: float) -> torch.Tensor:
    """The l0.5 penalty per mask: sum_i (1 + eps - w_i) ** 0.5. (K, L, H+1) -> (K,)"""
    return ((1 + eps - mask) ** 0.5).flatten(1).sum(dim=1)


class NonFiniteLoss(CircuitfindError):
    """The loss became NaN or inf; `last_good` holds the mask before the failing step."""

    def __init__(self, message: str, last_good: torch.Tensor):
        super().__init__(message)
        self.last_good = last_good


def train_mask(
    engine: FullEngine,
    readout: Readout,
    objectives: Sequence[Objective],
    lams: torch.Tensor,
    shape: tuple[int, int],
    lr: float,
    steps: int,
    eps: float,
    on_step: Callable[[int, torch.Tensor, Dict[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Learn K continuous masks (w = 1: keep, w = 0: patch). Returns (K, L, H+1), clamped."""
    k = lams.shape[0]
    mask = torch.ones(k, *shape, device=lams.device, requires_grad=True)
    opt = torch.optim.Adam([mask], lr=lr)
    for step in tqdm(range(steps), desc="mask", disable=not progress, leave=False):
        logs: Dict[str, torch.Tensor] = {}
        for obj in objectives:
            with torch.no_grad():
                mask.clamp_(0, 1)
            last_good = mask.detach().clone()
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros(k, device=lams.device)
            for prep, d0 in zip(obj.batches, obj.d0):
                # Desideratum losses are means over pairs: a size-weighted sum of sub-batch
                # means is the mean over all pairs, so sub-batching never changes the result.
                share = len(prep.pairs) / obj.n_pairs
                part = share * obj.desideratum.loss(patched_delta(engine, readout, prep, d0, mask))
                (obj.weight * part).sum().backward()
                loss_sum = loss_sum + part.detach()
            loss = obj.weight * loss_sum
            if obj.with_sparsity:
                penalty = lams * sparsity(mask, eps)
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
