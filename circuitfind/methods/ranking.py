"""A ranking of every unit, for MIB's faithfulness curves: the circuit first, then the regularisation path.

DBM's own weights rank only its circuit: beyond it nearly every weight sits at 1. With
`optimizer.path_lams`, a ladder of lambdas is trained side by side with the run's own, and each
unit is ranked by the largest lambda at which it is still patched (w < 0.5), then by how firmly
(1 - w at that lambda). The circuit's units come first whatever the path says, so the top
|circuit| of the ranking is the circuit the run reports. Most units are patched at no lambda of
the ladder, and their weights all sit at 1: they come last, ordered by `tail` (the run passes
what each restores under mean ablation, evaluation/restoring.py), so the curve's long end is
ordered by effect rather than by unit index.
"""

from __future__ import annotations

from typing import Sequence

import torch


def path_head(weights: torch.Tensor, circuit: torch.Tensor) -> torch.Tensor:
    """The units the path ranks by itself: the circuit's, and every unit some lambda patches (w < 0.5).
    weights (P, L, n_cols), circuit (L, n_cols) 0 = in the circuit -> (L, n_cols) bool, on the CPU"""
    return (weights.detach().cpu() < 0.5).any(0) | (circuit.cpu() == 0)


def path_scores(
    weights: torch.Tensor, lams: Sequence[float], circuit: torch.Tensor, tail: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores in (0, 1], higher = more important, from masks along a ladder of lambdas.

    weights (P, L, n_cols): the continuous mask at each lambda of `lams`; circuit (L, n_cols): 0 = in the
    run's circuit; tail (L, n_cols): higher first among the units no lambda patches (None: by 1 - w at
    the smallest lambda). Returns (L, n_cols)."""
    order = sorted(range(len(lams)), key=lambda i: lams[i])  # smallest lambda first
    w = weights[order].flatten(1).float().cpu()  # (P, N)
    patched = w < 0.5
    # For each unit: the index (in ascending lambda) of the largest lambda that patches it, -1 if none.
    steps = torch.arange(len(order))[:, None].expand_as(patched)
    last = torch.where(patched, steps, torch.full_like(steps, -1)).max(dim=0).values  # (N,)
    firmness = 1 - w[last.clamp(min=0), torch.arange(w.shape[1])]  # 1 - w where it was last patched
    if tail is not None:  # the tail's order as a fraction in [0, 1), in place of firmness
        unpatched = last < 0
        by_tail = tail.flatten().cpu().float()[unpatched].argsort(stable=True)
        fraction = torch.empty(int(unpatched.sum()))
        fraction[by_tail] = torch.arange(len(by_tail), dtype=torch.float32) / max(len(by_tail), 1)
        firmness[unpatched] = fraction
    in_circuit = (circuit.flatten().cpu() == 0).float()
    key = in_circuit * 1e6 + (last.float() + 1) * 10 + firmness  # circuit, then ladder step, then firmness
    ranks = torch.empty_like(key)
    ranks[key.argsort(stable=True)] = torch.arange(1, key.numel() + 1, dtype=key.dtype)
    return (ranks / key.numel()).view(circuit.shape)
