"""Evaluating masks on held-out pairs: greedy first-token accuracy and logit differences.

The first generated token of greedy decoding is the argmax of the final-position logits,
so the paper's "generated first digit" is read off one patched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Sequence

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.bootstrap import as_pair, interval, resampled_means
from circuitfind.methods.objective import clean_logit_diff
from circuitfind.model.engine import Engine, Prepared
from circuitfind.records.circuit import metric_key
from circuitfind.task.desiderata import Desideratum


@dataclass
class EvalSplit:
    """A held-out split of one desideratum with its unpatched reference values."""

    desideratum: Desideratum
    kind: str  # "test" (held-out pairs of the train operations) or "transfer"
    batches: List[Prepared]
    d0: List[torch.Tensor] = field(default_factory=list)  # (B,) per batch: logit diff of the clean base run
    d_alt: List[torch.Tensor] = field(default_factory=list)  # (B,) per batch: ... of the clean alternate run
    pred_base: List[torch.Tensor] = field(default_factory=list)  # (B,) per batch: the model's own first token
    pred_alt: List[torch.Tensor] = field(default_factory=list)  # (B,) per batch: ... on the alternate

    @property
    def name(self) -> str:
        return f"{self.desideratum.name}_{self.kind}"

    def key(self, metric: str) -> str:
        return metric_key(self.desideratum.name, self.kind, metric)


def prepare_split(desideratum: Desideratum, kind: str, batches: List[Prepared], engine: Engine) -> EvalSplit:
    """Run the unpatched model once on both prompts of every pair of the split."""
    split = EvalSplit(desideratum, kind, batches)
    readout = engine.readout
    with torch.no_grad():
        for prep in batches:
            p = prep.pairs
            h_base = engine.clean_final(prep)  # the cached engine: its prefix and the final token
            h_alt = prep.alt_hidden  # kept from the run that recorded the alternates' values
            split.d0.append(clean_logit_diff(engine, h_base, p))
            split.d_alt.append(clean_logit_diff(engine, h_alt, p))
            split.pred_base.append(readout.logits(h_base).argmax(-1).cpu())
            split.pred_alt.append(readout.logits(h_alt).argmax(-1).cpu())
    return split


def baseline_hits(split: EvalSplit) -> Dict[str, torch.Tensor]:
    """How well the unpatched model does on the split's base prompts, the ones a circuit is judged on, per pair.

    task_acc: its first token is the answer's first token (on a transfer split: the transfer
    operation's own prompts, not the alternates, which may use another operation);
    acc_unpatched: the desideratum's accuracy when nothing is patched (the floor a circuit must beat).
    """
    base_ok = torch.cat([pb == b.pairs.base_answer for pb, b in zip(split.pred_base, split.batches)])
    unpatched = hits(torch.cat(split.pred_base), _targets(split, own=False))
    return {"task_acc": base_ok, "acc_unpatched": unpatched}


def baseline_metrics(split: EvalSplit) -> Dict[str, float]:
    return {k: v.float().mean().item() for k, v in baseline_hits(split).items()}


def baseline_of(splits: Sequence[EvalSplit]) -> Dict[str, float]:
    """The unpatched model's metrics on every split, under their flat keys."""
    return {split.key(k): v for split in splits for k, v in baseline_metrics(split).items()}


def baseline_intervals(splits: Sequence[EvalSplit], seed: int = 0) -> Dict[str, List[float]]:
    """95% bootstrap intervals of baseline_of's figures, under the same keys."""
    out = {}
    for split in splits:
        for metric, per_pair in baseline_hits(split).items():
            out[split.key(metric)] = as_pair(interval(partial(resampled_means, per_pair), len(per_pair), seed=seed))
    return out


def low_baseline_warnings(
    splits: Sequence[EvalSplit], baseline: Dict[str, float], min_acc: float, strict: bool
) -> List[str]:
    """Warn (or, with strict, stop) when the unpatched model cannot do the task on a held-out split.

    `baseline` is baseline_of(splits)."""
    warnings = []
    for split in splits:
        value = baseline[split.key("task_acc")]
        if split.kind == "test" and value < min_acc:
            message = (
                f"the unpatched model answers only {value:.0%} of {split.name} prompts correctly "
                f"(min_baseline_acc={min_acc}); accuracies against arithmetic answers are not "
                "trustworthy; read the acc_model metrics, or use a model that can do the task"
            )
            if strict:
                raise CircuitfindError(message + " (strict=true)")
            warnings.append(message)
    return warnings


MIN_PAIRS = 20  # held-out pairs per split below which an interval means little
REACHED = 0.05  # a circuit reaches a desideratum when it beats the unpatched accuracy by more than this


def circuit_warnings(
    splits: Sequence[EvalSplit], metrics: Dict[str, float], baseline: Dict[str, float], remedy: str
) -> List[str]:
    """What a reader must not miss about one circuit's held-out figures: a circuit that reaches none of
    the desiderata that ask for a change (with `remedy`, the method's way to a larger circuit), and
    intervals that rest on too few pairs."""
    out = []
    moving = [s for s in splits if s.kind == "test" and s.desideratum.train and s.desideratum.target != "base"]
    floor = {s.name: baseline.get(s.key("acc_unpatched"), 0.0) for s in moving}
    if moving and all(metrics[s.key("acc")] <= floor[s.name] + REACHED for s in moving):
        accs = ", ".join(
            f"{s.desideratum.name.upper()} acc {metrics[s.key('acc')]:.2f} ({floor[s.name]:.2f} unpatched)"
            for s in moving
        )
        out.append(
            f"the circuit reaches none of its desiderata ({accs}): it does not carry what they ask for; {remedy}, "
            "or search other units"
        )
    fewest = min((sum(len(b.pairs) for b in s.batches) for s in splits if s.kind == "test"), default=MIN_PAIRS)
    if fewest < MIN_PAIRS:
        out.append(
            f"the held-out figures rest on {fewest} pairs per split, and their intervals mean little; "
            f"raise task.n_test to {MIN_PAIRS} or more"
        )
    return out


def _targets(split: EvalSplit, own: bool) -> torch.Tensor:
    """The answer each pair should give: the task's, or the model's own unpatched one. (N, S)

    With a token-set target every token of the set counts, own answer or not."""
    target = split.desideratum.target
    if not own or target == "tokens":
        return torch.cat([b.pairs.target for b in split.batches]).cpu()
    return torch.cat(split.pred_alt if target == "alternate" else split.pred_base)[:, None]


def hits(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether each prediction is one of its targets. pred (..., N), targets (N, S) -> (..., N)"""
    return (pred[..., None] == targets).any(-1)


def full_effects(split: EvalSplit) -> torch.Tensor:
    """Each pair's effect of patching everything: the clean alternate's d minus the base's d0. (N,)"""
    return (torch.cat(split.d_alt) - torch.cat(split.d0)).cpu()


def full_effect(split: EvalSplit) -> torch.Tensor:
    """The mean effect of patching everything."""
    return full_effects(split).mean()


@dataclass
class PairOutcomes:
    """What K masks do to each pair of a split: the figures of `evaluate_masks` before averaging."""

    hits: torch.Tensor  # (K, N) the first token is the task's target
    hits_model: torch.Tensor  # (K, N) ... is the unpatched model's own answer on the target prompt
    delta: torch.Tensor  # (K, N) d(patched) - d0
    full: torch.Tensor  # (N,) the effect of patching everything: the clean alternate's d minus d0

    def metrics(self, index: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        """Each metric per mask, (K,); with `index` (R, N), on each resample of the pairs, (K, R)."""
        if index is None:
            index = torch.arange(self.full.shape[0])[None]
            return {k: v[:, 0] for k, v in self.metrics(index).items()}
        delta = resampled_means(self.delta, index)
        return {
            "acc": resampled_means(self.hits, index),
            "acc_model": resampled_means(self.hits_model, index),
            "logit_diff": delta,
            "logit_diff_norm": delta / resampled_means(self.full, index),
        }

    def intervals(self, seed: int = 0) -> Dict[str, torch.Tensor]:
        """95% bootstrap interval of each metric per mask. {metric: (K, 2)}"""
        stats: Dict[str, torch.Tensor] = {}

        def statistic(index: torch.Tensor) -> torch.Tensor:
            stats.update(self.metrics(index))
            return torch.stack(list(stats.values()))  # (M, K, R)

        bounds = interval(statistic, self.full.shape[0], seed=seed)
        return dict(zip(stats, bounds))


@torch.no_grad()
def pair_outcomes(split: EvalSplit, engine: Engine, mask: torch.Tensor) -> PairOutcomes:
    """What each of K masks does to each pair of the split. mask (K, L, H+1)"""
    preds, deltas = [], []
    for prep, d0 in zip(split.batches, split.d0):
        hidden = engine.final_hidden(prep, mask)  # (K, B, hidden)
        preds.append(engine.readout.logits(hidden).argmax(-1).cpu())  # (K, B)
        deltas.append(engine.readout.logit_diff(hidden, prep.pairs.up, prep.pairs.down) - d0)
    pred = torch.cat(preds, dim=1)
    return PairOutcomes(
        hits=hits(pred, _targets(split, own=False)),
        hits_model=hits(pred, _targets(split, own=True)),
        delta=torch.cat(deltas, dim=1).cpu(),
        full=full_effects(split),
    )


@torch.no_grad()
def evaluate_masks(split: EvalSplit, engine: Engine, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Metrics of each of K masks on a split. mask (K, L, H+1) -> {metric: (K,)}

    acc: first token equals the task's target (the paper's metric); acc_model: equals
    the unpatched model's own answer on the target prompt; logit_diff: mean of
    d(patched) - d0; logit_diff_norm: that mean over the mean effect of patching
    everything (the clean alternate's d minus d0): 1 = full effect, 0 = none.
    """
    return pair_outcomes(split, engine, mask).metrics()


@torch.no_grad()
def evaluate_splits(
    splits: Sequence[EvalSplit],
    engine: Engine,
    mask: torch.Tensor,
    kinds: Sequence[str] = ("test", "transfer"),
    intervals: Dict[str, torch.Tensor] | None = None,
) -> Dict[str, torch.Tensor]:
    """Every metric of each of K masks on the splits of the given kinds. {key: (K,)}

    With `intervals` (a dict), their 95% bootstrap intervals are put in it under the same keys, (K, 2)."""
    out = {}
    for split in splits:
        if split.kind in kinds:
            outcomes = pair_outcomes(split, engine, mask)
            out |= {split.key(metric): value for metric, value in outcomes.metrics().items()}
            if intervals is not None:
                intervals |= {split.key(metric): value for metric, value in outcomes.intervals().items()}
    return out
