"""Evaluating masks on held-out pairs: greedy first-token accuracy and logit differences.

The first generated token of greedy decoding is the argmax of the final-position logits,
so the paper's "generated first digit" is read off one patched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.methods.objective import clean_logit_diff
from circuitfind.model.engine import FullEngine, Prepared
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


def prepare_split(desideratum: Desideratum, kind: str, batches: List[Prepared], engine: FullEngine) -> EvalSplit:
    """Run the unpatched model once on both prompts of every pair of the split."""
    split = EvalSplit(desideratum, kind, batches)
    readout = engine.readout
    with torch.no_grad():
        for prep in batches:
            p = prep.pairs
            h_base = engine.clean_hidden(p.base_ids, p.base_attn)
            h_alt = engine.clean_hidden(p.alt_ids, p.alt_attn)
            split.d0.append(clean_logit_diff(engine, h_base, p))
            split.d_alt.append(clean_logit_diff(engine, h_alt, p))
            split.pred_base.append(readout.logits(h_base).argmax(-1).cpu())
            split.pred_alt.append(readout.logits(h_alt).argmax(-1).cpu())
    return split


def baseline_metrics(split: EvalSplit) -> Dict[str, float]:
    """How well the unpatched model does on the split's base prompts, the ones a circuit is judged on.

    task_acc: its first token is the answer's first token (on a transfer split: the transfer
    operation's own prompts, not the alternates, which may use another operation);
    acc_unpatched: the desideratum's accuracy when nothing is patched (the floor a circuit must beat).
    """
    base_ok = torch.cat([pb == b.pairs.base_answer for pb, b in zip(split.pred_base, split.batches)])
    unpatched = hits(torch.cat(split.pred_base), _targets(split, own=False))
    return {"task_acc": base_ok.float().mean().item(), "acc_unpatched": unpatched.float().mean().item()}


def baseline_of(splits: Sequence[EvalSplit]) -> Dict[str, float]:
    """The unpatched model's metrics on every split, under their flat keys."""
    return {split.key(k): v for split in splits for k, v in baseline_metrics(split).items()}


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


def full_effect(split: EvalSplit) -> torch.Tensor:
    """The mean effect of patching everything: the clean alternate's d minus the base's d0."""
    return (torch.cat(split.d_alt) - torch.cat(split.d0)).cpu().mean()


@torch.no_grad()
def evaluate_masks(split: EvalSplit, engine: FullEngine, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Metrics of each of K masks on a split. mask (K, L, H+1) -> {metric: (K,)}

    acc: first token equals the task's target (the paper's metric); acc_model: equals
    the unpatched model's own answer on the target prompt; logit_diff: mean of
    d(patched) - d0; logit_diff_norm: that mean over the mean effect of patching
    everything (the clean alternate's d minus d0): 1 = full effect, 0 = none.
    """
    preds, deltas = [], []
    for prep, d0 in zip(split.batches, split.d0):
        hidden = engine.final_hidden(prep, mask)  # (K, B, hidden)
        preds.append(engine.readout.logits(hidden).argmax(-1).cpu())  # (K, B)
        deltas.append(engine.readout.logit_diff(hidden, prep.pairs.up, prep.pairs.down) - d0)
    pred = torch.cat(preds, dim=1)
    delta = torch.cat(deltas, dim=1).cpu()  # (K, N)
    full = full_effect(split)
    return {
        "acc": hits(pred, _targets(split, own=False)).float().mean(dim=1),
        "acc_model": hits(pred, _targets(split, own=True)).float().mean(dim=1),
        "logit_diff": delta.mean(dim=1),
        "logit_diff_norm": delta.mean(dim=1) / full,
    }


@torch.no_grad()
def evaluate_splits(
    splits: Sequence[EvalSplit], engine: FullEngine, mask: torch.Tensor, kinds: Sequence[str] = ("test", "transfer")
) -> Dict[str, torch.Tensor]:
    """Every metric of each of K masks on the splits of the given kinds. {key: (K,)}"""
    return {
        split.key(metric): value
        for split in splits
        if split.kind in kinds
        for metric, value in evaluate_masks(split, engine, mask).items()
    }
