"""Ablations: what a unit's final-position value becomes when the unit is taken out.

patching  the alternate prompt's value (the paper's interchange; DBM trains with it)
zero      zero
mean      the mean over a reference set of the task's prompts
resample  the value on another prompt of the task, drawn per pair from the reference set

The reference set is the distinct base prompts of every desideratum's train pairs: prompts of
the task that no held-out figure is computed on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.model.engine import Prepared
from circuitfind.model.hooks import FinalValues
from circuitfind.task.encoding import left_pad

if TYPE_CHECKING:
    from circuitfind.study.job import Job

ABLATIONS: Dict[str, str] = {
    "patching": "patched from the pair's alternate prompt (the paper's interchange)",
    "zero": "set to zero",
    "mean": "set to its mean over the reference prompts (the train pairs' base prompts)",
    "resample": "taken from a reference prompt drawn at random per pair (the train pairs' base prompts)",
}
NEEDS_REFERENCE = ("mean", "resample")


def ablation_kinds(extra: List[str]) -> List[str]:
    """The kinds a run evaluates: patching always (DBM's own), then the others asked for, once each."""
    unknown = [k for k in extra if k not in ABLATIONS]
    if unknown:
        raise CircuitfindError(
            f"evaluate.ablations={list(extra)} has an unknown kind {unknown[0]!r}; choose from {list(ABLATIONS)}"
        )
    return list(dict.fromkeys(["patching", *extra]))


@torch.no_grad()
def reference_values(job: "Job", minimum: int) -> FinalValues:
    """Every component's final-position value on each reference prompt. (N_ref, C) per layer"""
    texts = list(dict.fromkeys(pair.base.text for dd in job.data.values() for pair in dd.train))
    if len(texts) < minimum:
        raise CircuitfindError(
            f"mean and resample ablations need at least evaluate.min_reference={minimum} reference prompts and the "
            f"train pairs have {len(texts)} distinct base prompts; raise task.n_train to at least {minimum}, "
            "or lower evaluate.min_reference"
        )
    size = job.cfg.optimizer.batch_size or len(texts)
    parts = []
    for start in range(0, len(texts), size):
        ids, attn = left_pad([job.encoder.ids(t) for t in texts[start : start + size]], job.encoder.pad_id)
        parts.append(job.engine.final_values(ids, attn)[0])
    return FinalValues.concat(parts)


class Ablation:
    """The values an ablation of one kind patches in, per prepared batch (the same on every call)."""

    def __init__(self, kind: str, reference: FinalValues | None = None, seed: int = 0):
        if kind in NEEDS_REFERENCE and reference is None:
            raise ValueError(f"{kind} ablation needs reference values")
        self.kind = kind
        self.reference = reference
        self.mean = reference.map(lambda v: v.mean(dim=0, keepdim=True)) if reference is not None else None
        self.generator = torch.Generator().manual_seed(seed)
        self._drawn: Dict[int, FinalValues] = {}  # resample: one draw per batch, kept

    @property
    def description(self) -> str:
        return ABLATIONS[self.kind]

    def values(self, prep: Prepared) -> FinalValues | None:
        """What the batch's ablated units are set to; None: the alternates' (the engine's default)."""
        b = len(prep.pairs)
        if self.kind == "patching":
            return None
        if self.kind == "zero":
            return prep.alt_values.map(torch.zeros_like)
        if self.kind == "mean":
            return self.mean.map(lambda v: v.expand(b, -1))
        if id(prep) not in self._drawn:
            n_ref = self.reference.heads[0].shape[0]
            rows = torch.randint(0, n_ref, (b,), generator=self.generator)
            self._drawn[id(prep)] = self.reference.map(lambda v: v[rows.to(v.device)])
        return self._drawn[id(prep)]
