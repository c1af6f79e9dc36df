"""The desiderata objective: each term's pairs, its unpatched reference, and its loss under a mask.

For a pair, d = logit[up] - logit[down] at the final position (by default the alternate's
and the base's answers); a desideratum's loss is a function of d(patched) - d(unpatched) over
its pairs (docs/method.md), or the cross-entropy of its target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

from circuitfind.model.engine import Engine, Prepared
from circuitfind.task.desiderata import Desideratum
from circuitfind.task.encoding import EncodedPairs

MASK_CHUNK = 64  # masks evaluated together when scoring many candidate masks


@dataclass
class Objective:
    """One desideratum's training pairs, prepared by the engine, and its step settings."""

    desideratum: Desideratum
    batches: Sequence[Prepared]  # sub-batches of the training pairs (validation: `OnFirstUse`)
    d0: Sequence[torch.Tensor]  # per sub-batch (B,): logit difference of the unpatched base run
    weight: float
    with_sparsity: bool

    @property
    def shapes(self) -> List[Tuple[int, int]]:
        """Each sub-batch's pairs and tokens, without preparing one that is not prepared yet."""
        known = getattr(self.batches, "shapes", None)
        return list(known) if known is not None else [(len(p.pairs), p.pairs.base_ids.shape[1]) for p in self.batches]

    @property
    def n_pairs(self) -> int:
        return sum(pairs for pairs, _ in self.shapes)


class OnFirstUse(Sequence):
    """Items made when first read, then kept: the validation split's prepared sub-batches and their d0, so that
    pruning prepares (runs the alternates and the clean prompts of) only the pairs its comparisons reach
    (methods/staged_scores.py). `shapes`: each item's pairs and tokens, known before it is made."""

    def __init__(self, make: Callable[[int], object], shapes: Sequence[Tuple[int, int]]):
        self.make, self.shapes, self.made = make, list(shapes), {}

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i):
        if isinstance(i, slice):  # a view: its items are made (and kept) here, on first use too
            picked = range(len(self))[i]
            return OnFirstUse(lambda j: self[picked[j]], [self.shapes[j] for j in picked])
        i = range(len(self))[i]  # a negative index, or IndexError
        if i not in self.made:
            self.made[i] = self.make(i)
        return self.made[i]

    @property
    def prepared(self) -> int:
        """How many items have been made."""
        return len(self.made)


def clean_logit_diff(engine: Engine, hidden: torch.Tensor, pairs: EncodedPairs) -> torch.Tensor:
    """d = logit[up] - logit[down] from unpatched final hidden states. (B, hidden) -> (B,)"""
    return engine.readout.logit_diff(hidden[None], pairs.up, pairs.down)[0]


def unpatched_logit_diff(engine: Engine, prep: Prepared, keep: bool = False) -> torch.Tensor:
    """d0: the logit difference on the clean base run; `keep`: circuits will be scored on these pairs (the
    engine may keep the clean run for them). (B,)"""
    with torch.no_grad():
        return clean_logit_diff(engine, engine.clean_final(prep, keep), prep.pairs)


def patched_delta(engine: Engine, prep: Prepared, d0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d(patched) - d0 for each mask. mask (K, L, H+1) -> (K, B)"""
    hidden = engine.final_hidden(prep, mask)  # (K, B, hidden)
    d = engine.readout.logit_diff(hidden, prep.pairs.up, prep.pairs.down)
    return d - d0.to(d.device)


def loss_inputs(engine: Engine, des: Desideratum, prep: Prepared, d0: torch.Tensor, mask: torch.Tensor):
    """What a desideratum's loss reads under each mask: (delta, None), or (None, log p(target)) for
    cross-entropy. mask (K, L, H+1) -> (K, B) tensors"""
    if des.loss == "cross_entropy":
        return None, engine.readout.target_logprob(engine.final_hidden(prep, mask), prep.pairs.target)
    return patched_delta(engine, prep, d0, mask), None


def term_loss(engine: Engine, des: Desideratum, prep: Prepared, d0: torch.Tensor, mask: torch.Tensor):
    """A desideratum's loss on one sub-batch for each mask. mask (K, L, H+1) -> (K,)"""
    return des.loss_of(*loss_inputs(engine, des, prep, d0, mask))


def term_pair_loss(engine: Engine, des: Desideratum, prep: Prepared, d0: torch.Tensor, mask: torch.Tensor):
    """Each pair's share of that loss (the loss is their mean). mask (K, L, H+1) -> (K, B)"""
    return des.pair_loss(*loss_inputs(engine, des, prep, d0, mask))


def loss_parts(engine: Engine, obj: Objective, mask: torch.Tensor) -> Iterator[torch.Tensor]:
    """The term's loss per mask, one share per sub-batch; the shares add up to the loss. (K,) each

    Desideratum losses are means over pairs: a size-weighted sum of sub-batch means is the
    mean over all pairs, so sub-batching never changes the result.
    """
    for prep, d0 in zip(obj.batches, obj.d0):
        share = len(prep.pairs) / obj.n_pairs
        yield share * term_loss(engine, obj.desideratum, prep, d0, mask)


def objective_value(engine: Engine, objectives: Sequence[Objective], mask: torch.Tensor) -> torch.Tensor:
    """The desiderata objective (no sparsity term) of each of K masks. (K, L, H+1) -> (K,)"""
    total = torch.zeros(mask.shape[0], device=mask.device)
    for obj in objectives:
        for part in loss_parts(engine, obj, mask):
            total = total + obj.weight * part.to(total.device)
    return total


@torch.no_grad()
def objective_of_masks(
    engine: Engine, objectives: Sequence[Objective], masks: torch.Tensor, chunk: int = MASK_CHUNK
) -> torch.Tensor:
    """objective_value over many masks, `chunk` at a time. (N, L, H+1) -> (N,)"""
    return torch.cat([objective_value(engine, objectives, m) for m in masks.split(chunk)])
