"""Ablations: what a unit's value at its positions becomes when the unit is taken out.

patching  the alternate prompt's value (the paper's interchange; DBM trains with it)
zero      zero
mean      the mean over a reference set of the task's prompts
resample  the value on another prompt of the task, drawn per pair from the reference set

The reference set is the distinct base prompts of every desideratum's train pairs: prompts of
the task that no held-out figure is computed on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Sequence

import torch

from circuitfind.config.choices import ABLATIONS, NEEDS_REFERENCE
from circuitfind.errors import CircuitfindError
from circuitfind.model.engine import Engine, Prepared
from circuitfind.model.hooks import SiteIndex, SiteValues
from circuitfind.task.encoding import left_pad


def ablation_kinds(extra: List[str]) -> List[str]:
    """The kinds a run evaluates: patching always (DBM's own), then the others asked for, once each."""
    unknown = [k for k in extra if k not in ABLATIONS]
    if unknown:
        raise CircuitfindError(
            f"evaluate.ablations={list(extra)} has an unknown kind {unknown[0]!r}; choose from {list(ABLATIONS)}"
        )
    return list(dict.fromkeys(["patching", *extra]))


@dataclass
class Reference:
    """The units' values on the reference prompts, at every site: per (prompt, position, token)."""

    values: SiteValues  # (N_ref_sites, C) per point and layer
    where: SiteIndex  # rows index the reference prompts
    n_prompts: int

    def keys(self, where: SiteIndex, width: int) -> torch.Tensor:
        return where.slot * width + where.mention

    def mean(self) -> tuple[SiteValues, torch.Tensor, int]:
        """The mean value per (position, token): (n_keys, C) per layer, which keys have one, and the key width."""
        width = int(self.where.mention.max()) + 1
        keys = self.keys(self.where, width)
        n_keys = int(keys.max()) + 1
        counts = torch.zeros(n_keys).index_add_(0, keys, torch.ones(len(keys)))

        def mean(v: torch.Tensor) -> torch.Tensor:
            sums = torch.zeros(n_keys, v.shape[1], dtype=torch.float64, device=v.device)
            sums.index_add_(0, keys.to(v.device), v.double())
            return (sums / counts.clamp(min=1).to(v.device, torch.float64)[:, None]).to(v.dtype)

        return self.values.map(mean), counts > 0, width

    def lookup(self) -> torch.Tensor:
        """(n_prompts, P, M) the index of each reference site, -1 where a prompt has no such token."""
        table = torch.full(
            (self.n_prompts, int(self.where.slot.max()) + 1, int(self.where.mention.max()) + 1), -1, dtype=torch.long
        )
        table[self.where.rows, self.where.slot, self.where.mention] = torch.arange(len(self.where))
        return table


@dataclass
class ReferencePrompt:
    """One reference prompt: its tokens, and the units' token indices in it."""

    ids: List[int]
    positions: torch.Tensor  # (P, M) per position and token of the units' sites, -1 where the prompt has none


@torch.no_grad()
def reference_values(
    engine: Engine, prompts: Sequence[ReferencePrompt], pad_id: int, minimum: int, batch_size: int | None = None
) -> Reference:
    """Every unit's value at its positions on each reference prompt, `batch_size` prompts per forward."""
    if len(prompts) < minimum:
        raise CircuitfindError(
            f"mean and resample ablations (evaluate.ablations, and the ranking of optimizer.path_lams) need at least "
            f"evaluate.min_reference={minimum} reference prompts and the train pairs have {len(prompts)} distinct "
            f"base prompts; raise task.n_train to at least {minimum}, or lower evaluate.min_reference"
        )
    size = batch_size or len(prompts)
    parts, sites = [], []
    for start in range(0, len(prompts), size):
        batch = prompts[start : start + size]
        ids, attn = left_pad([p.ids for p in batch], pad_id)
        pos = torch.stack([shift(p.positions, len(p.ids), ids.shape[1]) for p in batch])
        where = SiteIndex.of(pos, pos)
        parts.append(engine.site_values(ids, attn, where.rows, where.base_tok)[0])
        where.rows += start
        sites.append(where)
    where = SiteIndex(*(torch.cat([getattr(w, f.name) for w in sites]) for f in fields(SiteIndex)))
    return Reference(SiteValues.concat(parts), where, len(prompts))


def shift(pos: torch.Tensor, old_width: int, new_width: int) -> torch.Tensor:
    """Token indices of a left-padded prompt moved to a batch `new_width` tokens wide (-1 kept)."""
    return torch.where(pos >= 0, pos + (new_width - old_width), pos)


class Ablation:
    """The values an ablation of one kind patches in, per prepared batch (the same on every call)."""

    def __init__(self, kind: str, reference: Reference | None = None, seed: int = 0):
        if kind in NEEDS_REFERENCE and reference is None:
            raise ValueError(f"{kind} ablation needs reference values")
        self.kind = kind
        self.reference = reference
        if reference is not None:
            self.mean, self.has_mean, self.key_width = reference.mean()
            self.table = reference.lookup()
        self.generator = torch.Generator().manual_seed(seed)
        self._drawn: Dict[int, SiteValues] = {}  # resample: one draw per batch, kept

    @property
    def description(self) -> str:
        return ABLATIONS[self.kind]

    def values(self, prep: Prepared) -> SiteValues | None:
        """What the batch's ablated units are set to; None: the alternates' (the engine's default)."""
        if self.kind == "patching":
            return None
        if self.kind == "zero":
            return prep.alt_values.map(torch.zeros_like)
        if self.kind == "mean":
            return self.mean_at(prep.where)
        if id(prep) not in self._drawn:
            drawn = torch.randint(0, self.reference.n_prompts, (len(prep.pairs),), generator=self.generator)
            self._drawn[id(prep)] = self.resampled(prep.where, drawn)
        return self._drawn[id(prep)]

    def mean_at(self, where: SiteIndex) -> SiteValues:
        keys = self.reference.keys(where, self.key_width)
        known = (where.mention < self.key_width) & (keys < len(self.has_mean))  # a token no reference prompt has
        if not bool(known.all()) or not bool(self.has_mean[keys].all()):
            raise CircuitfindError(
                "mean ablation: a position has more tokens in these prompts than in any reference prompt; "
                "give positions whose slots tokenise alike (one_token: true)"
            )
        return self.mean.map(lambda v: v[keys.to(v.device)])

    def resampled(self, where: SiteIndex, drawn: torch.Tensor) -> SiteValues:
        """Each site's value on the reference prompt drawn for its pair (its mean where that prompt lacks the token)."""
        table = self.table
        inside = (where.slot < table.shape[1]) & (where.mention < table.shape[2])
        entry = torch.full((len(where),), -1, dtype=torch.long)
        entry[inside] = table[drawn[where.rows[inside]], where.slot[inside], where.mention[inside]]
        if bool((entry >= 0).all()):
            return self.reference.values.map(lambda v: v[entry.to(v.device)])
        fallback = self.mean_at(where)
        return SiteValues(
            {
                p: [
                    torch.where((entry >= 0).to(m.device)[:, None], r[entry.clamp(min=0).to(r.device)], m)
                    for r, m in zip(self.reference.values.points[p], fallback.points[p])
                ]
                for p in self.reference.values.points
            }
        )
