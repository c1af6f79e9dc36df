"""The validation objective of circuits, scored on as many validation pairs as a decision needs.

Pruning compares circuits: may this one replace that one, which of these is best. Most comparisons
are clear on a few pairs (a needed unit's removal costs far more than the noise; a redundant unit's
costs nothing on every pair), a few are close (two cuts of one route that nearly tie), and on too
few pairs a close one is decided by the draw of the pairs. With `screen_pairs` the pairs are
scored in stages: that many first, then twice as many at each stage (so a close call needs few looks,
each scoring more pairs at once). A comparison is decided on the pairs scored so far once the paired
difference lies at least SURE standard errors from the line (at once when the two circuits' pair
losses differ by the same amount on every pair), and takes the next stage otherwise, up to every
pair. Without it there is one stage: every circuit is scored on every pair.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Dict, List, Sequence

import torch

from circuitfind.methods.objective import Objective, term_pair_loss
from circuitfind.model.engine import Engine
from circuitfind.model.masks import masks_of

SURE = 3.0  # standard errors of the paired difference that decide a comparison before every pair is scored


def stage_pairs(n_pairs: int, screen_pairs: int | None) -> List[int]:
    """The pairs each stage covers: screen_pairs, then twice as many at each stage, up to every pair."""
    if not screen_pairs:
        return [n_pairs]
    ends = [min(screen_pairs, n_pairs)]
    while ends[-1] < n_pairs:
        ends.append(min(2 * ends[-1], n_pairs))
    return ends


def stage_ends(objective: Objective, screen_pairs: int | None, stages: int) -> List[int]:
    """How many of the objective's batches each of `stages` stages covers: the fewest that hold the stage's
    pairs (every batch from the objective's own last stage on)."""
    covered = list(itertools.accumulate(pairs for pairs, _ in objective.shapes))
    want = stage_pairs(covered[-1], screen_pairs)
    want += [covered[-1]] * (stages - len(want))
    return [next(i + 1 for i, c in enumerate(covered) if c >= w) for w in want]


def first_stage(objectives: Sequence[Objective], screen_pairs: int | None) -> List[Objective]:
    """The objectives on the batches of the first stage (every batch without screening)."""
    ends = [stage_ends(o, screen_pairs, 1)[0] for o in objectives]
    return [replace(o, batches=o.batches[:n], d0=o.d0[:n]) for o, n in zip(objectives, ends)]


def packed(groups: Sequence[Sequence[int]], chunk: int) -> List[List[int]]:
    """The groups' items in chunks of at most `chunk`, in order, a group split only when it holds more: masks
    that share a run (`Engine.run_groups`) are scored in one batch."""
    chunks: List[List[int]] = []
    for group in groups:
        for start in range(0, len(group), chunk):
            piece = list(group[start : start + chunk])
            if chunks and len(chunks[-1]) + len(piece) <= chunk:
                chunks[-1] += piece
            else:
                chunks.append(piece)
    return chunks


class StagedScores:
    """J (sum of weight x desideratum loss, lower is better) of circuits on the validation pairs, each
    pair's share computed once and only when a comparison needs it."""

    def __init__(self, engine: Engine, objectives: Sequence[Objective], chunk: int, screen_pairs: int | None = None):
        self.engine, self.objectives, self.chunk, self.screen_pairs = engine, objectives, chunk, screen_pairs
        self.stages = max(len(stage_pairs(o.n_pairs, screen_pairs)) for o in objectives)
        self.ends = [stage_ends(o, screen_pairs, self.stages) for o in objectives]  # per objective, per stage
        self.losses: Dict[frozenset, List[List[torch.Tensor]]] = {}  # per circuit, objective, batch: (B,)
        self.pairs_scored = 0  # circuit x pair evaluations, the measure of what pruning cost

    @property
    def scored(self) -> Dict[frozenset, List[List[torch.Tensor]]]:
        """Every circuit scored, on at least the first stage."""
        return self.losses

    def record(self) -> Dict[str, Any]:
        """What screening did: its stages, the circuits scored on every pair, and the circuit x pair
        evaluations made against those that scoring every circuit on every pair makes."""
        whole = sum(
            all(len(batches) == ends[-1] for batches, ends in zip(parts, self.ends)) for parts in self.losses.values()
        )
        return {
            "screen_pairs": self.screen_pairs,
            "stages": self.stages,
            "circuits_on_every_pair": whole,
            "pairs_scored": self.pairs_scored,
            "pairs_without_screening": len(self.losses) * sum(o.n_pairs for o in self.objectives),
        }

    def score(self, circuits: Sequence[frozenset], stage: int) -> None:
        """Compute each circuit's pair losses up to `stage` (1-based), batch by batch."""
        for c in circuits:
            self.losses.setdefault(c, [[] for _ in self.objectives])
        for o, (obj, ends) in enumerate(zip(self.objectives, self.ends)):
            for b in range(ends[stage - 1]):
                todo = [c for c in dict.fromkeys(circuits) if len(self.losses[c][o]) == b]
                if not todo:
                    continue
                prep, d0 = obj.batches[b], obj.d0[b]
                masks = masks_of(todo, self.engine.space.shape, self.engine.device)
                chunks = packed(self.engine.run_groups(prep, masks), self.chunk)  # engine=cached: sharing runs
                with torch.no_grad():
                    parts = [term_pair_loss(self.engine, obj.desideratum, prep, d0, masks[rows]) for rows in chunks]
                order = [i for rows in chunks for i in rows]
                losses = torch.cat(parts).float().cpu()  # float32: a bf16 model's losses would blur the errors
                for i, row in zip(order, losses):
                    self.losses[todo[i]][o].append(row)
                self.pairs_scored += len(todo) * len(prep.pairs)

    def value(self, circuit: frozenset, stage: int) -> float:
        """J on the pairs of `stage`: each objective's mean pair loss, batch means weighted by size."""
        self.score([circuit], stage)
        total = torch.zeros(())
        for obj, ends, parts in zip(self.objectives, self.ends, self.losses[circuit]):
            n = sum(len(p) for p in parts[: ends[stage - 1]])
            for part in parts[: ends[stage - 1]]:
                total = total + obj.weight * ((len(part) / n) * part.mean())
        return float(total)

    def values(self, circuits: Sequence[frozenset], stage: int = 1) -> List[float]:
        """J of each circuit on the pairs of `stage` (the first: the cheapest estimate, for ordering)."""
        self.score(circuits, stage)
        return [self.value(c, stage) for c in circuits]

    def pairs_of(self, stage: int) -> int:
        """The validation pairs (of every objective) that `stage` covers."""
        return sum(
            sum(pairs for pairs, _ in obj.shapes[: ends[stage - 1]]) for obj, ends in zip(self.objectives, self.ends)
        )

    def spread(self, circuit: frozenset, other: frozenset, stage: int) -> float:
        """The standard error of J(circuit) - J(other) on the pairs of `stage`, from the paired differences."""
        variance = 0.0
        for obj, ends, mine, theirs in zip(self.objectives, self.ends, self.losses[circuit], self.losses[other]):
            diff = torch.cat(mine[: ends[stage - 1]]) - torch.cat(theirs[: ends[stage - 1]])
            if len(diff) > 1:
                variance += obj.weight**2 * float(diff.var()) / len(diff)
        return variance**0.5

    def at_most(self, circuit: frozenset, reference: frozenset, offset: float) -> bool:
        """Whether J(circuit) <= J(reference) + offset, on as many stages as that takes."""
        return self.each_at_most([(circuit, reference, offset)])[0]

    def each_at_most(
        self, comparisons: Sequence[tuple[frozenset, frozenset, float]], stages: int | None = None
    ) -> List[bool | None]:
        """For each (circuit, reference, offset), whether J(circuit) <= J(reference) + offset, each on as many
        stages as it takes (the same answer as one at a time); the circuits a stage needs are scored together,
        so that those sharing runs share them. With `stages`, on that many at most: None where still open."""
        decided: Dict[int, bool | None] = {}
        for stage in range(1, min(stages or self.stages, self.stages) + 1):
            open_ = [i for i in range(len(comparisons)) if i not in decided]
            self.score([c for i in open_ for c in comparisons[i][:2]], stage)
            for i in open_:
                circuit, reference, offset = comparisons[i]
                margin = self.value(reference, stage) + offset - self.value(circuit, stage)
                if stage == self.stages or abs(margin) >= SURE * self.spread(circuit, reference, stage):
                    decided[i] = margin >= 0
        return [decided.get(i) for i in range(len(comparisons))]

    def best(
        self, circuits: Sequence[frozenset], offsets: Sequence[float], incumbent: frozenset | None = None
    ) -> frozenset:
        """The circuit with the lowest J + offset (ties: the `incumbent`, the circuit in hand, then the lowest
        sorted units). A stage drops the circuits SURE standard errors above the best so far; the rest take
        the next, until one is left or every pair is scored."""
        contenders = dict(zip(circuits, offsets))
        for stage in range(1, self.stages + 1):
            keys = {c: v + contenders[c] for c, v in zip(contenders, self.values(list(contenders), stage))}
            lead = min(contenders, key=lambda c: (keys[c], c != incumbent, sorted(c)))
            if stage == self.stages:
                return lead
            contenders = {
                c: off
                for c, off in contenders.items()
                if c == lead or keys[c] - keys[lead] < SURE * self.spread(c, lead, stage)
            }
            if len(contenders) == 1:
                return lead
        raise AssertionError("unreachable: the last stage decides")
