"""Testing a circuit, whoever found it: necessity, sufficiency, MIB-style areas and minimality.

A circuit is a set of units. Under an ablation (evaluation/ablation.py) the model is run in four
conditions on every held-out pair:

full          nothing ablated (the model itself)
empty         every unit ablated
necessity     the circuit's units ablated, the rest kept: how much the model loses without it
sufficiency   every unit outside the circuit ablated, the circuit kept: how much it does alone

Each condition gives task_acc (the first token is the base prompt's own answer), the
desideratum's acc (its target; patching only, the other kinds have no alternate to follow)
and logit_diff d = logit[up] - logit[down] (evaluation/heldout.py). Faithfulness, MIB's
normalisation, is (d(condition) - d(empty)) / (d(full) - d(empty)): 1 = the whole model's
effect, 0 = none. With a ranking of the units (a run's mask weights, a MIB score file), the
faithfulness of the top n kept for n = 0, 1, 2, 5, ... on each held-out test split gives MIB's areas: CPR = the area
under it (higher is better), CMD = the area under |1 - it| (lower is better), over the
fraction of units kept.

Minimality: for each unit, the change of the held-out desiderata objective (the training
objective on held-out pairs, patching) when that unit alone is left out of the circuit; and the
redundant groups, units each unneeded alone but needed together.

Every figure carries a 95% bootstrap interval over the split's pairs.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

from circuitfind.config.choices import NEEDS_REFERENCE
from circuitfind.evaluation.ablation import Ablation, Reference, ablation_kinds
from circuitfind.evaluation.bootstrap import (
    LEVEL,
    estimates,
    interval,
    percentile_interval,
    resampled_means,
    resamples,
    rounded,
)
from circuitfind.evaluation.curves import curve_sizes
from circuitfind.evaluation.heldout import EvalSplit, _targets, hits
from circuitfind.methods.objective import term_pair_loss
from circuitfind.model.engine import Engine
from circuitfind.model.space import ComponentSpace
from circuitfind.records.circuit_source import CircuitUnderTest

CONDITIONS = ("full", "empty", "necessity", "sufficiency")
MASK_CHUNK = 16


def ablating_masks(members: torch.Tensor) -> torch.Tensor:
    """The mask of each condition that ablates something: empty, necessity, sufficiency; 1 = keep,
    0 = ablate (the full condition is the clean run). (L, H+1) -> (3, L, H+1)"""
    inside = members.float()
    return torch.stack([torch.zeros_like(inside), 1 - inside, inside])


def top_n_masks(scores: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Keep the top n units of the ranking, ablate the rest, for each n. (len(sizes), L, H+1)"""
    order = scores.flatten().argsort(descending=True, stable=True)
    masks = torch.zeros(len(sizes), scores.numel())
    for i, n in enumerate(sizes):
        masks[i, order[:n]] = 1
    return masks.view(len(sizes), *scores.shape)


@torch.no_grad()
def outcomes(split: EvalSplit, engine: Engine, masks: torch.Tensor, ablation: Ablation) -> Dict[str, torch.Tensor]:
    """Per pair, for the unpatched model (row 0, kept from the split's clean run) and under each mask:
    the base answer kept, the target hit, and d. {(1 + K, N)}"""
    preds, ds = [], []
    for prep in split.batches:
        values = ablation.values(prep)
        pred_parts, d_parts = [], []
        for part in masks.split(MASK_CHUNK):
            hidden = engine.final_hidden(prep, part.to(engine.device), values)
            pred_parts.append(engine.readout.logits(hidden).argmax(-1).cpu())
            d_parts.append(engine.readout.logit_diff(hidden, prep.pairs.up, prep.pairs.down).cpu())
        preds.append(torch.cat(pred_parts))
        ds.append(torch.cat(d_parts))
    pred = torch.cat([torch.cat(split.pred_base)[None], torch.cat(preds, dim=1)])
    d = torch.cat([torch.cat(split.d0).cpu()[None], torch.cat(ds, dim=1)])
    base_answer = torch.cat([prep.pairs.base_answer for prep in split.batches]).cpu()
    return {"task_hit": pred == base_answer, "hit": hits(pred, _targets(split, own=False)), "d": d}


def condition_statistic(per_pair: Dict[str, torch.Tensor], kind: str, n_curve: int, x: np.ndarray | None):
    """The figures of one split under one ablation, on a resample index (R, N) -> {name: (R,)}.

    Rows of per_pair: the CONDITIONS, then the top n kept for each n of the curve but its ends (n = 0
    is the empty condition, n = all the full one)."""

    def statistic(index: torch.Tensor) -> Dict[str, torch.Tensor]:
        task_acc = resampled_means(per_pair["task_hit"], index)
        acc = resampled_means(per_pair["hit"], index)
        d = resampled_means(per_pair["d"], index)
        span = d[0] - d[1]  # full - empty
        faith = (d - d[1]) / span
        out: Dict[str, torch.Tensor] = {}
        for c, name in enumerate(CONDITIONS):
            out[f"{name}/task_acc"] = task_acc[c]
            if kind == "patching":
                out[f"{name}/acc"] = acc[c]
            out[f"{name}/logit_diff"] = d[c]
            out[f"{name}/faithfulness"] = faith[c]
        out["necessity/task_acc_drop"] = task_acc[0] - task_acc[2]
        out["necessity/faithfulness_drop"] = 1 - faith[2]
        if n_curve:
            curve = faith[[1, *range(len(CONDITIONS), len(CONDITIONS) + n_curve - 2), 0]].numpy()  # (n_curve, R)
            with np.errstate(invalid="ignore"):  # a resample with no span gives inf - inf: undefined_areas says why
                out["cpr"] = torch.from_numpy(np.trapezoid(curve, x, axis=0))
                out["cmd"] = torch.from_numpy(np.trapezoid(np.abs(1 - curve), x, axis=0))
        return out

    return statistic


def split_report(
    split: EvalSplit, engine: Engine, circuit: CircuitUnderTest, ablation: Ablation, seed: int
) -> Dict[str, Any]:
    """Necessity, sufficiency and (with a ranking, on a held-out test split) the areas of one split
    under one ablation. The full condition is the split's clean run, not run again."""
    masks = ablating_masks(circuit.members)
    sizes: List[int] = []
    if circuit.scores is not None and split.kind == "test":
        sizes = curve_sizes(circuit.members.numel())
        masks = torch.cat([masks, top_n_masks(circuit.scores, sizes[1:-1])])
    per_pair = outcomes(split, engine, masks, ablation)
    x = np.array(sizes, dtype=float) / circuit.members.numel() if sizes else None
    n = per_pair["d"].shape[1]
    figures = estimates(condition_statistic(per_pair, ablation.kind, len(sizes), x), n, seed=seed)
    out: Dict[str, Any] = {"n_pairs": n}
    for name, value in figures.items():
        group, _, metric = name.rpartition("/")
        (out.setdefault(group, {}) if group else out)[metric] = value
    if sizes:
        d = per_pair["d"].float().mean(1)
        curve = d[[1, *range(len(CONDITIONS), len(d)), 0]]
        out["curve"] = {"sizes": sizes, "faithfulness": [rounded(v) for v in (curve - d[1]) / (d[0] - d[1])]}
        undefined = undefined_areas(per_pair["d"], seed)
        if undefined:
            out["cpr"] = out["cmd"] = None
            out["areas_undefined"] = undefined
    return out


def undefined_areas(d: torch.Tensor, seed: int) -> str | None:
    """Why faithfulness, and so CPR and CMD, mean nothing on a split, or None when they do: its
    normalisation d(full) - d(empty) cannot be told from zero (an invariance split, whose
    alternates leave the answer alone when everything is patched, divides noise by noise). d (1 + K, N)"""
    span = d[0].float() - d[1].float()
    low, high = interval(lambda index: resampled_means(span, index), span.numel(), seed=seed).tolist()
    if low > 0 or high < 0:
        return None
    return (
        f"d(full) - d(empty) = {span.mean():.3g}, 95% interval [{low:.3g}, {high:.3g}] includes 0: "
        "patching every unit does not move this split's logit difference, so faithfulness has no scale"
    )


MAX_PAIRED = 12  # flagged units whose every pair is left out together; more: only all of them at once


@torch.no_grad()
def minimality(
    splits: Sequence[EvalSplit],
    engine: Engine,
    circuit: CircuitUnderTest,
    space: ComponentSpace,
    min_share: float,
    seed: int,
) -> Dict[str, Any]:
    """Each unit's change of the held-out objective when it alone is left out of the circuit (patching),
    and the redundant groups: units each unneeded alone but needed together.

    The objective is the training one, sum of weight * loss over the trained desiderata, on their
    held-out pairs; a unit matters when leaving it out raises the objective. `share` is that
    rise over the circuit's whole improvement on patching nothing. A unit or a group is needed when
    its rise is told from zero (the interval's low end is above 0) and reaches `min_share` of the
    circuit's improvement; a unit that is not is flagged (`needed: false`). Leaving one unit out
    cannot judge two units that back each other up (two cuts of the same route): every pair of
    flagged units (all of them at once, past MAX_PAIRED) is left out together, and the pairs that
    are needed join into groups.
    """
    units = [u for u in space.units() if circuit.members[u.layer, u.col]]
    patched = 1 - circuit.members.float()
    terms = [s for s in splits if s.kind == "test" and s.desideratum.train]

    def left_out(groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point change, bootstrap changes and share of the objective for each group of units left out."""
        masks = [torch.ones_like(patched), patched]
        for group in groups:
            m = patched.clone()
            for i in group:
                m[units[i].layer, units[i].col] = 1
            masks.append(m)
        losses = [pair_losses(split, engine, torch.stack(masks)) for split in terms]  # (K, N_t) each
        indices = [resamples(loss.shape[1], seed=seed + t) for t, loss in enumerate(losses)]

        def objective(index_of: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
            return sum(
                s.desideratum.weight * resampled_means(loss, index_of(t, loss))
                for t, (s, loss) in enumerate(zip(terms, losses))
            )  # (K, R)

        point = objective(lambda t, loss: torch.arange(loss.shape[1])[None])[:, 0]
        boot = objective(lambda t, loss: indices[t])
        return point, boot[2:] - boot[1], point[2:] - point[1]

    def judged(point: torch.Tensor, boot_changes: torch.Tensor, changes: torch.Tensor, i: int) -> Dict[str, Any]:
        total = float(point[0] - point[1])
        change = float(changes[i])
        low, high = percentile_interval(boot_changes[i]).tolist()
        share = change / total if total > 0 else None
        return {
            "objective_change": {"value": rounded(change), "ci": [rounded(low), rounded(high)]},
            "share": None if share is None else rounded(share),
            "needed": low > 0 and share is not None and share >= min_share,
        }

    point, boot, changes = left_out([[i] for i in range(len(units))])
    rows = [{"unit": unit.name, **judged(point, boot, changes, i)} for i, unit in enumerate(units)]
    flagged = [i for i, row in enumerate(rows) if not row["needed"]]
    return {
        "objective": "sum of weight * desideratum loss on the held-out pairs of the trained desiderata "
        "(lower is better), units patched from the alternates",
        "circuit_objective": rounded(point[1]),
        "nothing_patched_objective": rounded(point[0]),
        "min_share": min_share,
        "units": rows,
        "not_needed": [rows[i]["unit"] for i in flagged],
        "redundant_groups": redundant_groups(flagged, units, left_out, judged),
    }


def redundant_groups(flagged: List[int], units, left_out, judged) -> List[Dict[str, Any]]:
    """Groups of flagged units that are needed together: pairs needed together, joined when they share a unit
    (or, past MAX_PAIRED flagged units, all of them when they are needed together)."""
    if len(flagged) < 2:
        return []
    candidates = list(itertools.combinations(flagged, 2)) if len(flagged) <= MAX_PAIRED else [tuple(flagged)]
    point, boot, changes = left_out(candidates)
    needed = [(group, judged(point, boot, changes, i)) for i, group in enumerate(candidates)]
    needed = [(group, figures) for group, figures in needed if figures["needed"]]
    groups: List[set] = []
    for group, _ in needed:  # join the pairs that share a unit
        touching = [g for g in groups if g & set(group)]
        merged = set(group).union(*touching)
        groups = [g for g in groups if not g & set(group)] + [merged]
    out = []
    for members in groups:
        inside = [figures for group, figures in needed if set(group) <= members]
        strongest = max(inside, key=lambda f: f["objective_change"]["value"])
        out.append({"units": [units[i].name for i in sorted(members)], **strongest})
    return out


def pair_losses(split: EvalSplit, engine: Engine, masks: torch.Tensor) -> torch.Tensor:
    """Each pair's loss of the split's desideratum under each mask (patching). (K, N)"""
    parts = []
    for prep, d0 in zip(split.batches, split.d0):
        chunks = [
            term_pair_loss(engine, split.desideratum, prep, d0, m.to(engine.device)) for m in masks.split(MASK_CHUNK)
        ]
        parts.append(torch.cat(chunks).cpu())
    return torch.cat(parts, dim=1)


class CircuitEvaluation:
    """The tests of any circuit on held-out splits, under every ablation kind `settings.ablations` asks for.

    `settings` is the `evaluate` config (ablations, min_share); `reference` gives the reference
    prompts' values of mean and resample ablations, asked for once, on first use."""

    def __init__(
        self,
        engine: Engine,
        splits: Sequence[EvalSplit],
        settings: Any,
        seed: int,
        reference: Callable[[], Reference],
    ):
        self.engine, self.splits, self.settings, self.seed = engine, splits, settings, seed
        self.kinds = ablation_kinds(list(settings.ablations))
        self._read_reference = reference
        self._reference: Reference | None = None

    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = self._read_reference()
        return self._reference

    def check_reference(self, needed: bool = False) -> None:
        """Stop now, before anything is written, if the mean or resample ablation has too few prompts; `needed`:
        the run needs the mean whatever the evaluation asks (the ranking of optimizer.path_lams)."""
        if needed or any(kind in NEEDS_REFERENCE for kind in self.kinds):
            self.reference()

    def __call__(self, circuit: CircuitUnderTest) -> Dict[str, Any]:
        engine, seed = self.engine, self.seed
        ablations = {}
        for kind in self.kinds:
            ablation = Ablation(kind, self.reference() if kind in NEEDS_REFERENCE else None, seed)
            ablations[kind] = {
                "description": f"ablated units are {ablation.description}",
                "splits": {s.name: split_report(s, engine, circuit, ablation, seed) for s in self.splits},
            }
        return {
            "circuit": circuit.names,
            "n_units": len(circuit.names),
            "n_components": engine.space.n_components,
            "source": circuit.source,
            "ranked_by": circuit.ranked_by,
            "intervals": f"{LEVEL:.0%} bootstrap intervals over each split's pairs",
            "conditions": {
                "full": "nothing ablated",
                "empty": "every unit ablated",
                "necessity": "the circuit's units ablated, the rest kept",
                "sufficiency": "every unit outside the circuit ablated, the circuit kept",
            },
            "faithfulness": "(d - d(empty)) / (d(full) - d(empty)), d the desideratum's logit difference",
            "ablations": ablations,
            "minimality": minimality(self.splits, engine, circuit, engine.space, self.settings.min_share, seed),
        }
