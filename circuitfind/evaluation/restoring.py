"""Ordering the units the desiderata leave alone: by how much of the model each restores under mean ablation.

DBM's regularisation path ranks the units its desiderata patch (methods/ranking.py). The rest are
units whose patching from an alternate changes nothing the desiderata measure: on IOI, a unit that
reads only the subject reads the same subject in every alternate. Yet the model may need them to
give its logit difference at all, and a faithfulness curve under mean ablation asks for them. So
the rest are ordered by what keeping them restores: from the state where the ranking's head is
kept and every other unit is set to its mean, each candidate is kept as well, and scored by how
much closer to 1 that brings the faithfulness of each trained desideratum on its training pairs
(summed over the desiderata). The best fill the ranking up to the next of MIB's budgets (0, 1, 2,
5, 10, 20, 50, ...); from that state the rest are scored again, and so on. Every figure is exact
(one run per candidate), not a first-order estimate: a unit's effect when the model around it is
ablated is far from the gradient at the full model.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from circuitfind.evaluation.ablation import Ablation
from circuitfind.evaluation.circuit_tests import outcomes, undefined_areas
from circuitfind.evaluation.curves import curve_sizes
from circuitfind.evaluation.heldout import EvalSplit
from circuitfind.model.engine import Engine
from circuitfind.model.masks import masks_of


def restoring_order(
    engine: Engine, splits: Sequence[EvalSplit], head: torch.Tensor, ties: torch.Tensor, ablation: Ablation, seed: int
) -> torch.Tensor:
    """Scores of the units outside `head` (L, n_cols; True = ranked first already): higher = earlier, by
    the restoring gain of each block (module docstring); 0 for the head's units. `ties` (L, n_cols) orders
    equal gains, higher first. Splits whose logit difference does not move when every unit is ablated
    (`undefined_areas`) have no scale and score nothing; with none left, the order is that of `ties`.
    (L, n_cols)"""
    n = head.numel()
    kept: List[int] = head.flatten().nonzero().flatten().tolist()
    rest: List[int] = [
        u for u in ties.flatten().argsort(descending=True, stable=True).tolist() if not head.flatten()[u]
    ]
    scaled = []
    for split in splits:
        d = outcomes(split, engine, torch.zeros(1, *head.shape), ablation)["d"]  # the model, every unit ablated
        if not undefined_areas(d, seed):
            scaled.append((split, d.double().mean(1)))
    for budget in curve_sizes(n):
        take = budget - len(kept)
        if take <= 0 or not rest or not scaled:
            continue
        gain = restoring_gains(engine, scaled, kept, rest, ablation)
        chosen = [rest[i] for i in gain.argsort(descending=True, stable=True)[:take].tolist()]
        kept += chosen
        taken = set(chosen)
        rest = [u for u in rest if u not in taken]
    order = kept[int(head.sum()) :] + rest
    scores = torch.zeros(n)
    scores[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order), 0, -1, dtype=torch.float32) / (n + 1)
    return scores.view(head.shape)


@torch.no_grad()
def restoring_gains(
    engine: Engine,
    splits: Sequence[tuple[EvalSplit, torch.Tensor]],
    kept: Sequence[int],
    candidates: Sequence[int],
    ablation: Ablation,
) -> torch.Tensor:
    """For each candidate unit: sum over the splits of |1 - f(kept)| - |1 - f(kept + the unit)|, f the
    faithfulness (d - d(empty)) / (d(full) - d(empty)) on the split's pairs, every unit not kept ablated.
    splits: each with its mean d of the model and of every unit ablated, (2,); kept, candidates: flat unit
    indices. (len(candidates),)"""
    shape = engine.space.shape
    masks = 1 - masks_of([kept, *([*kept, unit] for unit in candidates)], shape)  # 1 = kept, as ablations read it
    gain = torch.zeros(len(candidates))
    for split, (full, empty) in splits:
        d = outcomes(split, engine, masks, ablation)["d"][1:].double().mean(1)  # row 0: the model's own d
        miss = (1 - (d - empty) / (full - empty)).abs()
        gain += (miss[0] - miss[1:]).float()
    return gain
