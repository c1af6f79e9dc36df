"""Each unit alone, and the role its evidence supports (`circuitfind compare`).

For one run, on the held-out pairs of its task:

attention   where a head looks from the final token, by task slot (evaluation/attention.py)
effect      what patching the unit alone from the alternates does: each test split's accuracy and the
            change of d = logit[up] - logit[down], with its 95% interval and its share of patching
            everything; and the change of the held-out training objective
inhibition  for a head that reads the distractor: how much taking it out (mean ablation at the final
            token) changes where the later movers look, the answer's slots against the distractor's

The role rule (docs/ioi.md, 'Roles'), with the thresholds of `Thresholds`. The moving desideratum is
the first trained one whose target is the alternate's answer (IOI: `io`); its varied slots are the
*moved* slots (io); the *distractor* slots are the slot every `contrast:` of the task's desiderata names
(IOI: s, d = logit[IO] - logit[S]) and the slots that repeat it (`s2: {expr: s}`). For a head at `last`:

mover           attends to the moved slots >= attention, and patched alone from the moving desideratum's
                alternates moves d towards the alternate's answer by >= share of patching everything,
                its 95% interval above 0 (IOI: a name mover)
negative mover  the same attention, and d moves against the alternate's answer by >= share, its interval
                below 0 (IOI: a negative name mover)
inhibition      attends to the distractor slots >= attention, and mean-ablating it at the final token
                lowers the later movers' mean attention to the moved slots minus the distractor's by
                >= inhibition, its interval below 0 (IOI: S-inhibition)

Anything else has no role, with the figure that fell short. Nothing here knows a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from circuitfind.config.choices import LAST
from circuitfind.evaluation.ablation import Ablation, Reference
from circuitfind.evaluation.attention import attention_maps
from circuitfind.evaluation.bootstrap import as_pair, interval, resampled_means, rounded
from circuitfind.evaluation.circuit_tests import MASK_CHUNK, pair_losses
from circuitfind.evaluation.heldout import EvalSplit, PairOutcomes, pair_outcomes
from circuitfind.model.components import Sites
from circuitfind.model.engine import Engine
from circuitfind.model.hooks import SiteIndex, patch_sites
from circuitfind.model.masks import masks_of
from circuitfind.model.space import ComponentSpace, Unit
from circuitfind.task.desiderata import Desideratum
from circuitfind.task.encoding import PairEncoder, left_pad
from circuitfind.task.positions import slot_positions
from circuitfind.task.spec import Prompt, TaskSpec

MOVER, NEGATIVE_MOVER, INHIBITION = "mover", "negative mover", "inhibition"
ROLES = (MOVER, NEGATIVE_MOVER, INHIBITION)


@dataclass(frozen=True)
class Thresholds:
    """The role rule's thresholds (module docstring)."""

    attention: float = 0.3  # attention mass from the final token to a role's slots
    share: float = 0.05  # |Δd patched alone| over Δd patching everything
    inhibition: float = 0.05  # drop of the later movers' attention contrast when the head is ablated

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class RoleSlots:
    """What a task's roles read: the moving desideratum, the slots it varies, and the distractor's slots."""

    desideratum: str
    moved: Tuple[str, ...]
    distractor: Tuple[str, ...]


def role_slots(task: TaskSpec, desiderata: Sequence[Desideratum]) -> RoleSlots | None:
    """The task's moved and distractor slots (module docstring); None when no trained desideratum
    moves the answer to the alternate's, so no role can be judged."""
    moving = [d for d in desiderata if d.train and d.target == "alternate"]
    if not moving:
        return None
    contrast = list(dict.fromkeys(d.contrast for d in desiderata if d.contrast))
    repeats = [slot for slot, expr in task.derived if expr.text.strip() in contrast]
    return RoleSlots(moving[0].name, tuple(moving[0].vary), tuple(contrast + repeats))


def slot_mass(attention: Mapping[str, float], slots: Sequence[str]) -> float:
    """Attention to a group of slots: every label of each (`x`, or its mentions `x#1`, `x#2`)."""
    return sum(v for label, v in attention.items() if label.split("#")[0] in slots)


# -- patching each unit alone ------------------------------------------------------------------------


def chunked_outcomes(split: EvalSplit, engine: Engine, masks: torch.Tensor) -> PairOutcomes:
    """pair_outcomes over many masks, MASK_CHUNK at a time (the batch is K copies of the pairs)."""
    parts = [pair_outcomes(split, engine, m.to(engine.device)) for m in masks.split(MASK_CHUNK)]
    return PairOutcomes(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("hits", "hits_model", "delta")), parts[0].full
    )


@torch.no_grad()
def effects_alone(
    splits: Sequence[EvalSplit], engine: Engine, space: ComponentSpace, units: Sequence[Unit], seed: int = 0
) -> List[Dict[str, Any]]:
    """For each unit, what patching it alone from the alternates does on every held-out test split:
    acc, logit_diff (mean Δd, with its 95% interval) and share (Δd over patching everything); and
    objective_change, the held-out training objective's change from patching nothing (lower: it helps)."""
    if not units:
        return []
    masks = masks_of([[space.flat(u)] for u in units], space.shape)  # each unit alone
    tests = [s for s in splits if s.kind == "test"]
    out: List[Dict[str, Any]] = [{"unit": u.name, "splits": {}} for u in units]
    for split in tests:
        outcomes = chunked_outcomes(split, engine, masks)
        point, bounds = outcomes.metrics(), outcomes.intervals(seed)
        for i, row in enumerate(out):
            row["splits"][split.name] = {
                "acc": rounded(point["acc"][i]),
                "logit_diff": {"value": rounded(point["logit_diff"][i]), "ci": as_pair(bounds["logit_diff"][i])},
                "share": rounded(point["logit_diff_norm"][i]),
                "full_effect": rounded(outcomes.full.mean()),
            }
    trained = [s for s in tests if s.desideratum.train]
    if trained:
        nothing = torch.ones(1, *space.shape)
        change = torch.zeros(len(units))
        for split in trained:  # the objective: sum of weight * mean pair loss, as minimality reads it
            losses = pair_losses(split, engine, torch.cat([nothing, masks]))  # (1 + K, N)
            means = losses.float().mean(dim=1)
            change += split.desideratum.weight * (means[1:] - means[0])
        for row, value in zip(out, change.tolist()):
            row["objective_change"] = rounded(value)
    return out


# -- where the movers look, with a head taken out ------------------------------------------------------


@torch.no_grad()
def final_token_masses(
    model: torch.nn.Module,
    encoder: PairEncoder,
    task: TaskSpec,
    prompts: Sequence[Prompt],
    heads: Sequence[Tuple[int, int]],
    groups: Sequence[Sequence[str]],
    patched: Callable[[int, int], Any] | None = None,
) -> torch.Tensor:
    """Each head's attention from each prompt's final token to each group of slots. -> (heads, N, groups)

    `patched(n, width)`, when given, is a context manager the forward pass runs in (a head ablated)."""
    tokens = [encoder.tokenizer(p.text, add_special_tokens=True, return_offsets_mapping=True) for p in prompts]
    ids = [t["input_ids"] for t in tokens]
    batch, attn = left_pad(ids, encoder.pad_id)
    width = batch.shape[1]
    if patched is None:
        attentions = attention_maps(model, batch, attn)
    else:
        with patched(len(prompts), width):
            attentions = attention_maps(model, batch, attn)
    out = torch.zeros(len(heads), len(prompts), len(groups))
    for b, prompt in enumerate(prompts):
        shift = width - len(ids[b])  # left padding
        positions = slot_positions(tokens[b]["offset_mapping"], task.spans(prompt))
        for g, slots in enumerate(groups):
            idx = [shift + i for label, where in positions.items() if label.split("#")[0] in slots for i in where]
            if idx:
                for h, (layer, head) in enumerate(heads):
                    out[h, b, g] = attentions[layer][b, head, -1, idx].float().sum().cpu()
    return out


def mean_ablated(sites: Sites, space: ComponentSpace, reference: Reference, unit: Unit):
    """A context manager factory: `unit` (a head at `last`) set to its mean over the reference prompts at
    the final token of n left-padded prompts `width` wide, every other unit kept."""
    ablation = Ablation("mean", reference)
    slot = space.positions.index(LAST)
    mask = masks_of([[space.flat(unit)]], space.shape)

    def patched(n: int, width: int):
        last = torch.full((n,), width - 1, dtype=torch.long)
        where = SiteIndex(torch.arange(n), torch.full((n,), slot), torch.zeros(n, dtype=torch.long), last, last)
        return patch_sites(sites, mask, ablation.mean_at(where), where)

    return patched


def mover_contrast(masses: torch.Tensor) -> torch.Tensor:
    """Per prompt, the movers' mean attention to the moved slots minus the distractor's. (movers, N, 2) -> (N,)"""
    return (masses[..., 0] - masses[..., 1]).mean(dim=0)


@torch.no_grad()
def inhibition_effects(
    model: torch.nn.Module,
    encoder: PairEncoder,
    task: TaskSpec,
    prompts: Sequence[Prompt],
    sites: Sites,
    space: ComponentSpace,
    reference: Reference,
    candidates: Sequence[Unit],
    movers: Sequence[Unit],
    slots: RoleSlots,
    seed: int = 0,
) -> Dict[str, Dict[str, Any]]:
    """For each candidate head: the change of the later movers' attention contrast (moved minus distractor
    slots, from the final token) when the candidate is mean-ablated at the final token, with its 95% interval
    over prompts; the candidates with no mover in a later layer are left out."""
    groups = [slots.moved, slots.distractor]
    mover_heads = [(u.layer, u.head) for u in movers]
    clean = final_token_masses(model, encoder, task, prompts, mover_heads, groups)  # (M, N, 2)
    out: Dict[str, Dict[str, Any]] = {}
    for unit in candidates:
        later = [i for i, m in enumerate(movers) if m.layer > unit.layer]
        if not later:
            continue
        patched = mean_ablated(sites, space, reference, unit)
        ablated = final_token_masses(model, encoder, task, prompts, [mover_heads[i] for i in later], groups, patched)
        change = mover_contrast(ablated) - mover_contrast(clean[later])  # (N,)
        low, high = interval(partial(resampled_means, change), len(change), seed=seed).tolist()
        out[unit.name] = {
            "movers": [movers[i].name for i in later],
            "contrast": rounded(mover_contrast(clean[later]).mean()),
            "change": {"value": rounded(change.mean()), "ci": [rounded(low), rounded(high)]},
        }
    return out


# -- the rule ----------------------------------------------------------------------------------------


def judge(
    unit: Unit,
    attention: Mapping[str, float] | None,
    effect: Mapping[str, Any] | None,
    inhibition: Mapping[str, Any] | None,
    slots: RoleSlots | None,
    thresholds: Thresholds,
) -> Tuple[str | None, str]:
    """(role, the evidence for it) by the rule of the module docstring; (None, what fell short) when none."""
    if slots is None:
        return None, "no trained desideratum moves the answer to the alternate's: no role is judged"
    if unit.kind != "head" or unit.position != LAST:
        return None, "roles are judged for heads at the final token"
    if attention is None or effect is None:
        return None, "no attention or effect measured"
    moved, distractor = slot_mass(attention, slots.moved), slot_mass(attention, slots.distractor)
    share = effect["share"]
    low, high = effect["logit_diff"]["ci"]
    moved_slots, distractor_slots = ", ".join(slots.moved), ", ".join(slots.distractor) or "(none)"
    t = thresholds
    if moved >= t.attention:
        reads = f"attends to {moved_slots} {moved:.2f} >= {t.attention:g}"
        if share >= t.share and low > 0:
            return MOVER, f"{reads}; patched alone moves d to the alternate's answer, share {share:+.2f} >= {t.share:g}"
        if share <= -t.share and high < 0:
            return NEGATIVE_MOVER, f"{reads}; patched alone moves d against the alternate's answer, share {share:+.2f}"
    if distractor >= t.attention and inhibition is not None:
        change = inhibition["change"]
        c_low, c_high = change["ci"]
        if change["value"] <= -t.inhibition and c_high < 0:
            return INHIBITION, (
                f"attends to {distractor_slots} {distractor:.2f} >= {t.attention:g}; mean-ablated, the later movers' "
                f"attention to {moved_slots} minus {distractor_slots} changes by {change['value']:+.3f} "
                f"[{c_low:+.3f}, {c_high:+.3f}]"
            )
    short = [f"attention to {moved_slots} {moved:.2f}, to {distractor_slots} {distractor:.2f}"]
    short.append(f"share alone {share:+.2f} [Δd {low:+.2f}, {high:+.2f}]")
    if inhibition is not None:
        short.append(f"movers' contrast change when ablated {inhibition['change']['value']:+.3f}")
    elif distractor >= t.attention:
        short.append("no mover in a later layer to test inhibition against")
    return None, "; ".join(short)
