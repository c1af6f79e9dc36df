"""Evaluating masks on held-out pairs: greedy first-token accuracy and logit differences.

The first generated token of greedy decoding is the argmax of the final-position logits,
so the paper's "generated first digit" is read off one patched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from circuitfind.desiderata import Desideratum
from circuitfind.engine import FullEngine, Prepared, Readout


@dataclass
class EvalSplit:
    """A held-out split of one desideratum with its unpatched reference values."""

    name: str  # e.g. vd_test, oi_transfer
    desideratum: Desideratum
    batches: List[Prepared]
    d0: List[torch.Tensor]  # (B,) per batch: logit diff of the clean base run
    d_alt: List[torch.Tensor]  # (B,) per batch: the same logit diff on the clean alternate run
    pred_base: List[torch.Tensor]  # (B,) per batch: the unpatched model's first token on the base
    pred_alt: List[torch.Tensor]  # (B,) per batch: ... on the alternate


def prepare_split(
    name: str, desideratum: Desideratum, batches: List[Prepared], engine: FullEngine, readout: Readout
) -> EvalSplit:
    """Run the unpatched model once on both prompts of every pair of the split."""
    split = EvalSplit(name, desideratum, batches, [], [], [], [])
    with torch.no_grad():
        for prep in batches:
            p = prep.pairs
            h_base = engine.clean_hidden(p.base_ids, p.base_attn)
            h_alt = engine.clean_hidden(p.alt_ids, p.alt_attn)
            split.d0.append(readout.logit_diff(h_base[None], p.alt_answer, p.base_answer)[0])
            split.d_alt.append(readout.logit_diff(h_alt[None], p.alt_answer, p.base_answer)[0])
            split.pred_base.append(readout.logits(h_base).argmax(-1).cpu())
            split.pred_alt.append(readout.logits(h_alt).argmax(-1).cpu())
    return split


def baseline_metrics(split: EvalSplit) -> Dict[str, float]:
    """How well the unpatched model does: its task accuracy, and the desideratum's accuracy
    when nothing is patched (the floor a circuit must beat)."""
    base_ok = torch.cat([pb == b.pairs.base_answer for pb, b in zip(split.pred_base, split.batches)])
    alt_ok = torch.cat([pa == b.pairs.alt_answer for pa, b in zip(split.pred_alt, split.batches)])
    target = _targets(split, own=False)
    unpatched = torch.cat(split.pred_base) == target
    return {
        "task_acc": torch.cat([base_ok, alt_ok]).float().mean().item(),
        "acc_unpatched": unpatched.float().mean().item(),
    }


def _targets(split: EvalSplit, own: bool) -> torch.Tensor:
    """The answer each pair should give: arithmetic, or the model's own unpatched one."""
    if split.desideratum.wants_alternate_answer:
        parts = split.pred_alt if own else [b.pairs.alt_answer for b in split.batches]
    else:
        parts = split.pred_base if own else [b.pairs.base_answer for b in split.batches]
    return torch.cat(parts)


@torch.no_grad()
def evaluate_masks(
    split: EvalSplit, engine: FullEngine, readout: Readout, mask: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Metrics of each of K masks on a split. mask (K, L, H+1) -> {metric: (K,)}

    acc: first token equals the arithmetic target (the paper's metric); acc_model: equals
    the unpatched model's own answer on the target prompt; logit_diff: mean of
    d(patched) - d0; logit_diff_norm: that mean over the mean effect of patching
    everything (the clean alternate's d minus d0): 1 = full effect, 0 = none.
    """
    preds, deltas = [], []
    for prep, d0 in zip(split.batches, split.d0):
        hidden = engine.final_hidden(prep, mask)  # (K, B, hidden)
        preds.append(readout.logits(hidden).argmax(-1).cpu())  # (K, B)
        deltas.append(readout.logit_diff(hidden, prep.pairs.alt_answer, prep.pairs.base_answer) - d0)
    pred = torch.cat(preds, dim=1)
    delta = torch.cat(deltas, dim=1).cpu()  # (K, N)
    full_effect = (torch.cat(split.d_alt) - torch.cat(split.d0)).cpu().mean()
    return {
        "acc": (pred == _targets(split, own=False)).float().mean(dim=1),
        "acc_model": (pred == _targets(split, own=True)).float().mean(dim=1),
        "logit_diff": delta.mean(dim=1),
        "logit_diff_norm": delta.mean(dim=1) / full_effect,
    }
