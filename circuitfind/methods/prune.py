"""Pruning a found circuit on the validation split: the smallest circuit that keeps what it does.

In a space with redundant routes (units at several positions, the residual stream) the search
can patch several cuts of the same information flow at once, and a unit that helps the training
pairs only is kept too. Pruning judges each unit on pairs the search never saw:

1. The objective J (the training objective, sum of weight * desideratum loss, lower is better)
   is measured on the validation pairs with nothing patched, J(none), and with the circuit, J(raw).
   With criterion "bound" (the default) pruning may give up `tolerance` of the circuit's
   improvement: every circuit it keeps has J <= J(raw) + tolerance * (J(none) - J(raw)). With
   "price" each unit must buy `tolerance` of that improvement: a circuit replaces another when
   J + price * size, price = tolerance * (J(none) - J(raw)), is no larger. The bound depends on how
   good this run's rounded mask is; the price only on its scale, so runs whose rounded masks differ
   can agree on the smallest circuit (what that needs: docs/search.md).
2. Whole positions first (`prune.by_position`, on in prune=stable): equivalent cuts of one route often
   lie at different positions (the organism's planted heads at the final token, and the layer-0 heads
   at x that feed them), and unit by unit, elimination removes first whichever cut is redundant while
   both are whole, then cannot let the other go. So the circuit's units at one position (holding two
   or more: one unit is elimination's) are kept alone, or removed together, the smallest such circuit
   that may replace it first (ties: the lower J), while one may. A space with one position has nothing
   to drop. In the residual stream whole layers are groups too: the stream at one layer is a cut of
   every route (no head or MLP bypasses it), so one layer's units at x's tokens and another layer's at
   the tokens after x are two cuts of one route.
3. Backward elimination: every unit's removal alone is scored at once; then, least harmful first
   (ties: the unit the search patched least firmly, the highest mask weight), each unit goes when
   the circuit without it stays within that bound. A unit whose removal alone leaves the bound
   is not tried again in that pass; passes repeat, each scoring the removals alone in the circuit
   left, until one removes nothing (a unit needed beside a harmful one may go once that one has).
4. Putting in: the search can leave out a unit of the smallest cut and patch a larger cut in its
   place, and elimination can remove first a unit that would have let two others go. The PUT_IN
   units outside the circuit that patching alone would help most, to first order (attribution on
   the validation pairs: one backward pass), are put in one at a time and kept while elimination
   runs again; the result replaces the circuit when it is smaller, until no unit helps. A trial is
   smaller only if two units go: it runs only if one of the circuits it could end in (the unit and all
   but two of the circuit's units, or fewer) may replace the circuit (a circuit of two: the unit alone,
   decided outright; a few more, screened on the first stage when the pairs are scored in stages), and
   stops once all but one unit could not go alone.
5. A smaller circuit, exactly: greedy elimination can keep one cut of a route when the rounded mask
   held two, one smaller (it removes first whichever cut is redundant at the start). So every subset
   of the rounded mask (and what step 4 put in) of each size below the result's is scored, smallest
   size first, while their count stays within MAX_SMALLER; the best one within the bound, if any,
   replaces the circuit. `smaller_search.complete` says whether every smaller size was covered: then
   no subset smaller than the pruned circuit stays within the bound. When only the single units fit
   and the circuit has three or more, it is skipped: step 4 has tried the units that do most alone.
   It runs only when the circuit changed: it corrects elimination's choice of what to remove first,
   and where no unit of the rounded mask could go alone, no choice was made (on SmolLM2 IOI, six
   units none of which can go, it scored 56 subsets: a quarter of the search's time).
6. Criterion "price" only: a unit of the circuit is swapped for one of the rounded mask's (or one put
   in) while that lowers J. Steps 2-5 compare smaller circuits only, and elimination keeps whichever
   cut of a route it reaches first; under the bound any circuit within it will do, under the price
   the same size with a lower J is a better circuit.

Every comparison (may this circuit replace that one; which of these is best) is made by StagedScores
(methods/staged_scores.py): on every validation pair, or with `prune.screen_pairs` on as many as it
needs, so that a close call between two cuts is judged on all the pairs and a clear one on the first
few. J(none) and J(raw), which set the bound or the price, and the pruned circuit's J, in the record, are on
the first stage's pairs (every pair without screening; `objective.pairs` says how many): a later stage's
pairs are prepared (their alternates and clean prompts run) only when a comparison first needs them.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Sequence

import torch

from circuitfind.methods.baselines import attribution_scores
from circuitfind.methods.objective import MASK_CHUNK, Objective
from circuitfind.methods.staged_scores import StagedScores, first_stage
from circuitfind.model.engine import Engine
from circuitfind.model.masks import masks_of
from circuitfind.model.memory import free_memory, scoring_chunk
from circuitfind.model.space import ComponentSpace

PUT_IN = 3  # units outside the circuit tried in: those whose patching gains most alone, to first order
MAX_OUTCOMES = 16  # a trial of putting a unit in is screened first by what it could end in while they are this
# few (a circuit of four units: 11; of six: 57, which took longer to score at three positions than the trial)
MAX_SMALLER = 64  # subsets of the rounded mask scored in the exact search: about 64 forward passes of the
# validation pairs at most (at four positions, 12 units: every single unit, 0.6 s; 500 took 16 s)
CPU_CHUNK = 8  # masks scored together on a CPU, where larger batches cost more per mask (the organism at
# three positions: pruning took about 15% less time than with batches of 11-12); elsewhere up to MASK_CHUNK,
# as many as the device's free memory holds (model/memory.py)


class Pruner:
    """Backward elimination, putting units in, and an exact search, scored by the objective on the validation pairs."""

    def __init__(
        self,
        scores: StagedScores,
        firmness: torch.Tensor,
        tolerance: float,
        ranked: Sequence[int] = (),
        criterion: str = "bound",
        groupings: Sequence[Sequence[str]] = (),
    ):
        self.scores, self.tolerance, self.criterion = scores, tolerance, criterion
        self.ranked = list(ranked)  # every unit, the most worth patching alone first (attribution)
        # each a label per unit (its position; in the residual stream also its layer), to drop whole groups first
        self.groupings = [list(labels) for labels in groupings]
        self.firmness = firmness.detach().flatten().cpu()  # the search's mask weight: low = patched firmly
        self.raw = frozenset()  # the rounded mask being pruned
        self.allowance = 0.0  # criterion "bound": how far above J(raw) a kept circuit's J may lie
        self.price = 0.0  # criterion "price": what each unit must lower J by

    def fits(self, circuit: frozenset, than: frozenset, smaller_by: int) -> bool:
        """Whether `circuit`, `smaller_by` units smaller than `than`, may replace it."""
        return self.each_fits([(circuit, than, smaller_by)])[0]

    def each_fits(
        self, trials: Sequence[tuple[frozenset, frozenset, int]], stages: int | None = None
    ) -> List[bool | None]:
        """`fits` for each (circuit, than, smaller_by), the circuits scored together (methods/staged_scores.py); with
        `stages`, on that many at most (None: not decided by then)."""
        if self.criterion == "bound":
            return self.scores.each_at_most([(circuit, self.raw, self.allowance) for circuit, _, _ in trials], stages)
        return self.scores.each_at_most([(circuit, than, self.price * by) for circuit, than, by in trials], stages)

    def drop_groups(self, circuit: frozenset, dropped: List[Dict[str, Any]]) -> frozenset:
        """Keep the circuit's units of one group (a position; a layer of the residual stream) alone, or remove
        them together, the smallest such circuit that may replace it first (ties: the lower J on the first
        stage), while one may; `dropped` records each, with the groups it left out."""
        while True:
            trials: Dict[frozenset, List[str]] = {}  # each trial, and the groups it leaves out
            for labels in self.groupings:
                at: Dict[str, List[int]] = {}
                for unit in sorted(circuit):
                    at.setdefault(labels[unit], []).append(unit)
                if len(at) < 2:
                    continue
                for units in (units for units in at.values() if len(units) > 1):  # one unit alone: elimination's
                    for trial in (circuit - set(units), frozenset(units)):
                        trials.setdefault(trial, sorted(set(at) - {labels[u] for u in trial}))
            if not trials:
                return circuit
            values = self.scores.values(list(trials))  # one batch of masks
            order = sorted(zip(trials, values), key=lambda tv: (len(tv[0]), tv[1], sorted(tv[0])))
            found = next(((c, v) for c, v in order if self.fits(c, circuit, len(circuit) - len(c))), None)
            if found is None:
                return circuit
            smaller, value = found
            dropped.append({"groups": trials[smaller], "removed": sorted(circuit - smaller), "objective": value})
            circuit = smaller

    def eliminate(
        self,
        circuit: frozenset,
        steps: List[Dict[str, Any]] | None = None,
        keep: frozenset = frozenset(),
        need: int = 0,
    ) -> frozenset:
        """Remove units but those in `keep`, least harmful alone first, while J stays within the bound;
        `steps` records each removal. With `need`, the caller wants only a result with at least that
        many units removed: `circuit` itself comes back, unscored, as soon as fewer could go."""
        units = sorted(circuit - keep, key=lambda u: (-float(self.firmness[u]), u))  # ties: least firm first
        head = max(len(units) - max(need - 1, 0), 0)  # when none of these can go alone, fewer than `need` can
        start = circuit
        can_go = self.each_fits([(start - {u}, start, 1) for u in units[:head]])  # each alone, scored together
        if need and not any(can_go):
            return circuit
        alone = self.scores.values([circuit - {u} for u in units])  # the first stage's estimate orders them
        can_go += self.each_fits([(start - {u}, start, 1) for u in units[head:]])
        for _, unit, goes in sorted(zip(alone, units, can_go), key=lambda trial: trial[0]):  # stable: ties by firmness
            if not goes:
                continue
            smaller = circuit - {unit}
            if self.fits(smaller, circuit, 1):
                if steps is not None:
                    (value,) = self.scores.values([smaller])
                    steps.append({"removed": unit, "objective": value})
                circuit = smaller
        return circuit

    def eliminate_all(self, circuit: frozenset, steps: List[Dict[str, Any]] | None = None) -> frozenset:
        """Elimination passes until one removes nothing."""
        while True:
            smaller = self.eliminate(circuit, steps)
            if smaller == circuit:
                return circuit
            circuit = smaller

    def replaces(self, circuit: frozenset, kept: frozenset) -> bool:
        """Whether a smaller `circuit` may replace `kept` (always within the bound when elimination made it)."""
        return self.fits(circuit, kept, len(kept) - len(circuit))

    def put_in(self, kept: frozenset) -> tuple[frozenset, List[int]]:
        """Put in, one at a time, the PUT_IN units outside `kept` that attribution ranks first (removed ones
        or ones the search left out), and eliminate again with that unit kept; taken when the result is
        smaller, until none is. Returns the circuit and the units put in."""
        candidates = [u for u in self.ranked if u not in kept][:PUT_IN]
        added: List[int] = []
        while True:
            trials = (self.put_in_trial(kept, unit) for unit in candidates if unit not in kept)
            smaller = next((trial for trial in trials if len(trial) < len(kept) and self.replaces(trial, kept)), None)
            if smaller is None:
                return kept, added
            smaller = self.eliminate_all(smaller)  # a unit needed beside one that went may go now
            added += sorted(smaller - kept)
            kept = smaller

    def put_in_trial(self, kept: frozenset, unit: int) -> frozenset:
        """`kept` with `unit` put in and elimination run again, `unit` kept: smaller than `kept` only when two units
        go, so it can end only in `unit` with all but two of kept's units, or fewer. Those outcomes are scored
        first, and unless one of them may replace `kept` no trial is run, whose close calls between cuts of one
        route would decide nothing. With two units in `kept` the outcome is `unit` alone: one comparison, decided
        outright. Several, while at most MAX_OUTCOMES, are screened on the first stage when the pairs are scored
        in stages (at the organism's final token, whether a planted head may go once an MLP is in took a third of
        pruning's time, on every pair); on one stage each would take every pair, more than the trial, which stops
        once all but one unit could not go alone. Returns `kept` when no smaller circuit can come of it."""
        outcomes = [
            frozenset({unit, *rest})
            for size in range(len(kept) - 1)
            for rest in itertools.combinations(sorted(kept), size)
        ]
        if len(outcomes) == 1 or (self.scores.stages > 1 and len(outcomes) <= MAX_OUTCOMES):
            fit = self.each_fits([(c, kept, len(kept) - len(c)) for c in outcomes], None if len(outcomes) == 1 else 1)
            if all(f is False for f in fit):
                return kept
        return self.eliminate(kept | {unit}, keep=frozenset({unit}), need=2)

    def swap(self, kept: frozenset, pool: frozenset) -> frozenset:
        """Criterion price: swap one unit of `kept` for one of `pool` while that lowers J. The size, and so the
        price, stays: elimination and the exact search compare smaller circuits only, and greedy elimination
        keeps whichever cut of a route it reaches first."""
        while True:
            trials = swap_trials(kept, pool)
            if not trials:
                return kept
            # `kept` races its trials: one surely worse than it is dropped on the first stage, even when
            # the trials are close to one another (when no swap helps, as at the end, they mostly are)
            best = self.scores.best([kept, *trials], [0.0] * (len(trials) + 1), incumbent=kept)
            if best == kept:
                return kept
            kept = self.eliminate_all(best)  # a unit needed beside the one swapped out may go now

    def smaller(self, raw: frozenset, kept: frozenset) -> tuple[frozenset, Dict[str, Any]]:
        """The best subset of `raw` (the rounded mask and what was put in), below len(kept), that may replace
        `kept`: under the bound the best of the smallest size that has one, under the price the lowest
        J + price * size over every size scored. Every subset of each size is scored in turn while the count
        stays within MAX_SMALLER; `kept` when none may replace it."""
        below = range(1, len(kept))
        fit = [size for size in below if sum(math.comb(len(raw), s) for s in range(1, size + 1)) <= MAX_SMALLER]
        if fit == [1] and len(kept) > 2:
            # single units only: putting in has tried those that do most alone, and at positions these
            # 12-15 circuits never replaced a circuit while costing a quarter of pruning's time
            skipped = f"only single units fit within MAX_SMALLER ({MAX_SMALLER})"
            return kept, {"sizes": 0, "subsets": 0, "complete": False, "skipped": skipped}
        scored, within = 0, []
        for size in fit:
            subsets = [frozenset(c) for c in itertools.combinations(sorted(raw), size)]
            # under the price a swap round follows, from `kept` unless a subset replaces it: its first trials are
            # scored in this batch, so that a subset that is a trial's units before the final token shares its run
            ahead = swap_trials(kept, raw) if self.criterion == "price" and size == fit[0] else []
            self.scores.values(subsets + ahead)  # one batch of masks
            scored += len(subsets)
            # the bound: the best of the smallest size that has one; the price: J + price * size, over every size
            within += [
                c for c, ok in zip(subsets, self.each_fits([(c, kept, len(kept) - size) for c in subsets])) if ok
            ]
            if within and self.criterion == "bound":
                found = self.scores.best(within, [0.0] * len(within))
                return found, {"sizes": size, "subsets": scored, "complete": True}
        found = self.scores.best(within, [self.price * len(c) for c in within]) if within else kept
        return found, {"sizes": len(fit), "subsets": scored, "complete": fit == list(below)}

    def __call__(self, circuit: frozenset) -> tuple[frozenset, Dict[str, Any]]:
        """The pruned circuit, and what pruning did (objectives, removals, additions)."""
        self.raw = circuit
        # the improvement's scale, which the bound or the price is a share of: on the first stage's pairs (every
        # pair without screening), so that pruning prepares later pairs only for the comparisons that need them
        none, raw = self.scores.values([frozenset(), circuit])
        improvement = none - raw
        if self.criterion == "bound":
            self.allowance = self.tolerance * max(improvement, 0.0)
        else:
            self.price = self.tolerance * max(improvement, 0.0)
        steps: List[Dict[str, Any]] = []
        dropped: List[Dict[str, Any]] = []
        kept = self.eliminate_all(self.drop_groups(circuit, dropped), steps)
        kept, added = self.put_in(kept)
        greedy = kept
        if kept == circuit:
            search = {"sizes": 0, "subsets": 0, "complete": False, "skipped": "nothing was removed or put in"}
        else:
            kept, search = self.smaller(circuit | kept, kept)
        searched = kept
        if self.criterion == "price":
            kept = self.swap(searched, circuit | greedy)
        (final,) = self.scores.values([kept])
        return kept, {
            "tolerance": self.tolerance,
            "criterion": self.criterion,
            "objective": {"nothing_patched": none, "raw": raw, "pruned": final, "pairs": self.scores.pairs_of(1)}
            | ({"bound": raw + self.allowance} if self.criterion == "bound" else {"price": self.price}),
            "kept_share": (none - final) / improvement if improvement > 0 else None,
            "removed": sorted(circuit - kept),
            "by_position": dropped,
            "elimination": steps,
            "put_in": [u for u in added if u in kept],
            "smaller_search": search | {"replaced": sorted(greedy) if searched != greedy else None},
            "swapped": {"out": sorted(searched - kept), "in": sorted(kept - searched)},
            "circuits_scored": len(self.scores.scored),
        } | ({"screening": self.scores.record()} if self.scores.stages > 1 else {})


@torch.no_grad()
def prune_circuits(
    engine: Engine, objectives: Sequence[Objective], rounded: torch.Tensor, weights: torch.Tensor, settings
) -> List[tuple[torch.Tensor, Dict[str, Any]]]:
    """Prune each rounded mask (0 = patched) on the validation objectives; returns each pruned mask with its
    record, units by name. `settings` is the prune config (tolerance, criterion, screen_pairs: scored in
    stages when given, methods/staged_scores.py; by_position: drop whole groups first, `unit_groupings`). rounded, weights
    (K, L, n_cols)"""
    screen = settings.screen_pairs
    with torch.enable_grad():  # the units worth putting in (on the first stage's pairs): one order for every mask
        gain = attribution_scores(engine, first_stage(objectives, screen), engine.device).flatten().cpu()
    ranked = gain.argsort(descending=True, stable=True).tolist()
    chunk = CPU_CHUNK if engine.device.type == "cpu" else device_chunk(engine, objectives)
    groupings = unit_groupings(engine.space) if settings.by_position else []
    return [
        prune_one(
            engine,
            StagedScores(engine, objectives, chunk, screen),
            r,
            w,
            settings.tolerance,
            ranked,
            settings.criterion,
            groupings,
        )
        for r, w in zip(rounded, weights)
    ]


def swap_trials(kept: frozenset, pool: frozenset) -> List[frozenset]:
    """`kept` with one of its units swapped for one of `pool`'s outside it: a swap round's trials."""
    return [(kept - {out}) | {put} for out in sorted(kept) for put in sorted(pool - kept)]


def unit_groupings(space: ComponentSpace) -> List[List[str]]:
    """The groups whose units pruning first keeps alone or drops together: per unit its position, and in the
    residual stream its layer too (the stream at one layer is a cut of every route)."""
    units = list(space.units())
    positions = [unit.position for unit in units]
    return [positions, [f"layer {unit.layer}" for unit in units]] if space.kind == "residual" else [positions]


def device_chunk(engine: Engine, objectives: Sequence[Objective]) -> int:
    """Circuits scored together on an accelerator: up to MASK_CHUNK, as many as its free memory holds for the
    largest validation batch (on LLaMA-13B, 50 pairs of 25 tokens: about 2.4 GiB each)."""
    pairs = max(pairs for obj in objectives for pairs, _ in obj.shapes)
    tokens = max(tokens for obj in objectives for _, tokens in obj.shapes)
    dtype = engine.readout.weight.dtype
    return scoring_chunk(
        engine.sites, engine.model.config, dtype, pairs, tokens, free_memory(engine.device), MASK_CHUNK
    )


def prune_one(
    engine: Engine,
    scores: StagedScores,
    rounded: torch.Tensor,
    weights: torch.Tensor,
    tolerance: float,
    ranked: Sequence[int],
    criterion: str = "bound",
    groupings: Sequence[Sequence[str]] = (),
) -> tuple[torch.Tensor, Dict[str, Any]]:
    """Prune one rounded mask; `ranked`: every unit, the most worth patching alone first; `groupings`: labels of
    each unit, to drop whole groups first (`unit_groupings`; none: unit by unit only). rounded, weights (L, n_cols)"""
    names = engine.space.names()
    circuit = frozenset(int(i) for i in (rounded.flatten() == 0).nonzero().flatten().tolist())
    kept, record = Pruner(scores, weights, tolerance, ranked, criterion, groupings)(circuit)
    pruned = masks_of([kept], engine.space.shape, rounded.device)[0].to(rounded.dtype)
    record["removed"] = [names[u] for u in record["removed"]]
    record["put_in_from_outside"] = [names[u] for u in record["put_in"] if u not in circuit]
    record["put_in"] = [names[u] for u in record["put_in"]]
    replaced = record["smaller_search"]["replaced"]
    record["smaller_search"]["replaced"] = [names[u] for u in replaced] if replaced else None
    record["swapped"] = {side: [names[u] for u in units] for side, units in record["swapped"].items()}
    record["by_position"] = [step | {"removed": [names[u] for u in step["removed"]]} for step in record["by_position"]]
    record["elimination"] = [
        {"removed": names[s["removed"]], "objective": s["objective"]} for s in record["elimination"]
    ]
    return pruned, record
