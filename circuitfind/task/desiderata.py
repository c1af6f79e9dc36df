"""Desiderata as data: which slots an alternate changes, what the patched model should do, the loss.

Each entry of `desiderata.terms` (configs/desiderata/*.yaml) becomes a `Desideratum`.
For a pair, d = logit[up] - logit[down] at the final position: by default up is the
alternate's answer and down the base's (the paper's logit difference), so a pair whose two
answers start with the same token carries no signal and is never drawn. `contrast: <slot>`
makes down that slot's value in the base prompt (IOI's logit[IO] - logit[S]); `tokens`
makes up a token set (its log-sum-exp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.task.spec import Problem, TaskSpec

TARGETS = ("alternate", "base", "tokens")  # follow the alternate's answer, keep the base's, or move to a token set
LOSSES = ("neg_delta", "delta_squared", "cross_entropy")  # -Δ (push d up), Δ² (keep d), -log p(target)
WITHIN = ("split", "train")  # the varied slots range over the pair's own split, or the train split


@dataclass(frozen=True)
class Desideratum:
    """One causal property the circuit must have, and the optimisation step it gets."""

    name: str  # short, used in metric keys: <name>_test/acc
    title: str  # for figures and reports
    vary: Tuple[str, ...]  # slots the alternate prompt changes
    within: str = "split"
    target: str = "alternate"
    tokens: Tuple[str, ...] = ()  # target=tokens: the token set to move towards
    contrast: Optional[str] = None  # a slot whose base value is d's other token
    loss: str = "neg_delta"
    weight: float = 1.0
    with_sparsity: bool = False  # this step's loss carries the sparsity term
    train: bool = True  # False: only evaluated

    @property
    def needs_new_answer(self) -> bool:
        """d compares the two answers: pairs whose answers share their balance key carry no signal."""
        return self.contrast is None and self.target != "tokens"

    def alternates(self, task: TaskSpec, base: Problem, split: str) -> List[Problem]:
        """Candidate alternates of `base`: every change of the varied slots the task allows, whose
        answer starts otherwise when d compares the two answers (a pair with no signal is never drawn)."""
        return task.varied(base, self.vary, "train" if self.within == "train" else split, self.needs_new_answer)

    @property
    def flat_when_unpatched(self) -> bool:
        """Whether the loss's gradient is zero with nothing patched (delta = 0): Δ² there, unlike -Δ or the
        cross-entropy. A first-order estimate at w = 1 (attribution) gains nothing from such a term."""
        return self.loss == "delta_squared"

    def loss_of(self, delta: torch.Tensor, target_logprob: Optional[torch.Tensor]) -> torch.Tensor:
        """Loss per mask from delta = d(patched) - d(unpatched) or log p(target), (K, B) -> (K,)."""
        return self.pair_loss(delta, target_logprob).mean(dim=-1)

    def pair_loss(self, delta: torch.Tensor, target_logprob: Optional[torch.Tensor]) -> torch.Tensor:
        """Each pair's share of the loss (the loss is their mean), (K, B) -> (K, B)."""
        if self.loss == "neg_delta":
            return -delta  # push d towards the target
        if self.loss == "delta_squared":
            return delta**2  # keep d where the unpatched model had it
        return -target_logprob


def desideratum_from(entry: Mapping, task: TaskSpec) -> Desideratum:
    """A `desiderata.terms` entry, checked against the task, as a `Desideratum`."""
    name = str(entry["name"])
    where = f"desiderata.terms[{name}]"
    vary = tuple(entry.get("vary") or ())
    checks = [
        (bool(vary), f"{where}.vary is empty; name the slots the alternate changes, e.g. vary: [x]"),
        (entry.get("within", "split") in WITHIN, f"{where}.within={entry.get('within')!r}; choose from {WITHIN}"),
        (entry.get("target", "alternate") in TARGETS, f"{where}.target={entry.get('target')!r}; choose from {TARGETS}"),
        (entry.get("loss", "neg_delta") in LOSSES, f"{where}.loss={entry.get('loss')!r}; choose from {LOSSES}"),
        (
            (entry.get("target") == "tokens") == bool(entry.get("tokens")),
            f"{where}: target: tokens goes with tokens: [...] (the token set), and only with it",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise CircuitfindError(message)
    for slot in vary + ((entry["contrast"],) if entry.get("contrast") else ()):
        if slot not in task.enumerated:
            raise CircuitfindError(
                f"{where} names slot {slot!r}, which task {task.name} lacks; its slots are {task.enumerated}"
            )
    return Desideratum(
        name=name,
        title=str(entry.get("title") or name),
        vary=vary,
        within=str(entry.get("within", "split")),
        target=str(entry.get("target", "alternate")),
        tokens=tuple(entry.get("tokens") or ()),
        contrast=entry.get("contrast"),
        loss=str(entry.get("loss", "neg_delta")),
        weight=float(entry.get("weight", 1.0)),
        with_sparsity=bool(entry.get("with_sparsity", False)),
        train=bool(entry.get("train", True)),
    )


def desiderata_from(cfg: Mapping, task: TaskSpec) -> List[Desideratum]:
    """Every desideratum of a `desiderata` config, trained ones first, names unique."""
    out = [desideratum_from(e, task) for e in cfg["terms"]]
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise CircuitfindError(f"desiderata.terms names {names}: give each desideratum its own name")
    return sorted(out, key=lambda d: not d.train)


def trained(desiderata: Sequence[Desideratum]) -> List[Desideratum]:
    return [d for d in desiderata if d.train]
