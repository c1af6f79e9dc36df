"""The circuit, not a superset: pruning on the validation split, redundant groups, the regularisation
path's ranking, and the gate forms, on the organism (planted circuit known) and on made-up objectives."""

from __future__ import annotations

import itertools
import json
import logging
from types import SimpleNamespace
from typing import Callable, Dict, FrozenSet

import pytest
import torch
import transformers as tf
from omegaconf import OmegaConf
from safetensors.torch import load_file

from circuitfind.evaluation.circuit_tests import redundant_groups
from circuitfind.methods import prune
from circuitfind.methods.gates import ClampGate, HardConcreteGate, SigmoidGate, make_gate
from circuitfind.methods.prune import Pruner, device_chunk, unit_groupings
from circuitfind.methods.ranking import path_scores
from circuitfind.model.memory import GIB, scoring_chunk
from circuitfind.model.space import ComponentSpace
from circuitfind.records.circuit import pruning_line, read_record
from circuitfind.runs.job import Job
from circuitfind.runs.train import run_search

from conftest import compose, train_error

PLANTED = ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]
QUIET = ("+desiderata=vd_oi", "progress=false", "plots=false")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """The default run on the organism: DBM, then pruning on the validation split."""
    run_dir = tmp_path_factory.mktemp("pruned") / "run"
    run_search(compose(*QUIET), run_dir)
    return run_dir


def test_the_default_run_reports_exactly_the_planted_circuit(pruned_run):
    record = read_record(pruned_run)
    assert sorted(record.names) == PLANTED and record.headline_circuit == "pruned"
    assert record.planted["exact"] and record.planted["precision"] == record.planted["recall"] == 1.0
    for key in ("vd_test/acc", "oi_test/acc", "vd_transfer/acc"):
        assert record.metrics[key] >= 0.98, key
    # The rounded mask it came from, with its own figures: L1.H2 helps the 50 training pairs only.
    assert sorted(record.raw["circuit"]) == sorted(PLANTED + ["L1.H2"]) and record.raw["n_patched"] == 5
    assert set(record.raw["metrics"]) == {k for k in record.metrics if not k.startswith("continuous/")}
    assert record.raw["planted"]["precision"] == 0.8
    assert record.pruning["removed"] == ["L1.H2"] and record.pruning["put_in"] == []
    j = record.pruning["objective"]
    assert j["pruned"] <= j["bound"] == pytest.approx(j["raw"] + 0.01 * (j["nothing_patched"] - j["raw"]))
    masks = load_file(pruned_run / "mask.safetensors")
    assert int((masks["rounded"] == 0).sum()) == 5 and int((masks["circuit"] == 0).sum()) == 4


def test_the_validation_pairs_are_prepared_after_the_search_and_timed_as_pruning(tmp_path, monkeypatch):
    """Preparing them (their alternates' runs, prefixes and clean runs) is part of what pruning costs, and
    they need not hold memory while the mask is trained."""
    from circuitfind.runs import train

    events = []
    objectives, find, prune_circuits = Job.objectives, train.Run.find, train.prune_circuits
    monkeypatch.setattr(Job, "objectives", lambda job, split="train": events.append(split) or objectives(job, split))
    monkeypatch.setattr(train.Run, "find", lambda *a: events.append("search") or find(*a))
    monkeypatch.setattr(train, "prune_circuits", lambda *a: events.append("pruning") or prune_circuits(*a))
    (record,) = run_search(compose(*QUIET, "optimizer.steps=2"), tmp_path / "run")
    assert events[events.index("search") :] == ["search", "validation", "pruning"]
    assert record.timing["prune_s"] > 0


def test_after_pruning_every_unit_is_needed_alone(pruned_run):
    ev = json.loads((pruned_run / "eval.json").read_text())
    assert sorted(ev["circuit"]) == PLANTED
    assert ev["minimality"]["not_needed"] == [] and ev["minimality"]["redundant_groups"] == []
    assert all(row["objective_change"]["ci"][0] > 0 for row in ev["minimality"]["units"])


def test_the_validation_split_is_drawn_apart_and_changes_no_other_split(pruned_run):
    from circuitfind.runs.job import Job

    job = Job(compose(*QUIET))
    paper = Job(compose(*QUIET, "experiment=paper"), loaded=job.loaded)
    for name, dd in job.data.items():
        assert len(dd.validation) == 50 and not paper.data[name].validation
        assert (dd.train, dd.test, dd.transfer) == (
            paper.data[name].train,
            paper.data[name].test,
            paper.data[name].transfer,
        )
        seen = {p.base.problem.values for p in dd.train + dd.test}
        assert not seen & {p.base.problem.values for p in dd.validation}
    assert (
        read_record(pruned_run).data["fingerprint"] != read_record(pruned_run).config
        and job.encoded[("vd", "validation")]
    )


def test_the_log_says_which_circuit_is_the_headline(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run_search(compose(*QUIET, "optimizer.steps=30"), tmp_path / "run")
    assert "pruned circuit of" in caplog.text and "before pruning, the rounded mask patched" in caplog.text
    assert "pruning on the validation pairs removed" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("prune.tolerance=1.5",), "prune.tolerance=1.5 must lie in [0, 1]"),
        (("prune.tolerance=-0.1",), "prune.tolerance=-0.1 must lie in [0, 1]"),
        (("task.n_validation=5",), "task.n_validation=5 is too few pairs to prune on (prune.min_pairs=20)"),
        (("optimizer.gate=sigmoidal",), "optimizer.gate='sigmoidal' is unknown"),
        (("prune.criterion=cost",), "prune.criterion='cost' is unknown; choose from ['bound', 'price']"),
        (("prune.screen_pairs=10",), "prune.screen_pairs=10 is too few pairs to judge a circuit on"),
        (
            ("optimizer.temperature=[0.1,1.0]",),
            "optimizer.temperature=[0.1, 1.0]; give [start, end] with start >= end > 0",
        ),
    ],
)
def test_bad_pruning_and_gate_settings_are_one_line_before_any_model_is_loaded(overrides, message, monkeypatch):
    from circuitfind.runs import job

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(job, "load_model", no_loading)
    line = train_error(*QUIET, *overrides)
    assert line is not None and message in line, line


def test_a_small_validation_split_is_fine_without_pruning():
    assert train_error(*QUIET, "prune=none", "task.n_validation=5", "optimizer.steps=1") is None


class MadeUpScores:
    """Scores by a made-up objective of the set of units, instead of a model: one stage, every J exact."""

    stages = 1

    def __init__(self, objective: Callable[[FrozenSet[int]], float]):
        self.fn = objective
        self.scored: Dict[frozenset, float] = {}

    def values(self, circuits, stage=1):
        for c in circuits:
            self.scored.setdefault(c, self.fn(c))
        return [self.scored[c] for c in circuits]

    def pairs_of(self, stage):
        return 0  # no pairs: every J is exact

    def record(self):
        return {}  # no pairs screened (a test may set `stages` to take the staged paths)

    def each_at_most(self, comparisons, stages=None):  # one stage: every comparison is decided on it
        return [value <= ref + offset for (circuit, reference, offset) in comparisons
                for value, ref in [self.values([circuit, reference])]]  # fmt: skip

    def best(self, circuits, offsets, incumbent=None):
        keys = {c: v + off for c, v, off in zip(circuits, self.values(circuits), offsets)}
        return min(circuits, key=lambda c: (keys[c], c != incumbent, sorted(c)))


class ScoredPruner(Pruner):
    """A pruner scored by a made-up objective of the set of units."""

    def __init__(
        self,
        objective: Callable[[FrozenSet[int]], float],
        n: int,
        tolerance: float,
        ranked=(),
        criterion="bound",
        groupings=(),
    ):  # ranked: attribution's order; groupings: labels of each unit (its position...), to drop whole groups first
        super().__init__(MadeUpScores(objective), torch.zeros(n), tolerance, ranked, criterion, groupings)

    @property
    def scored(self):
        return self.scores.scored


def cuts(*routes: set, extra: Dict[int, float] | None = None) -> Callable[[FrozenSet[int]], float]:
    """J = -100 when some route is fully patched, -50 x the best route's patched share otherwise;
    `extra` units lower J a little more (a unit that helps the training pairs only)."""

    def j(units: FrozenSet[int]) -> float:
        best = max(len(r & units) / len(r) for r in routes)
        value = -100.0 if best == 1 else -50.0 * best
        return value - sum(v for u, v in (extra or {}).items() if u in units)

    return j


def test_pruning_keeps_the_smaller_of_two_redundant_routes():
    small, large = {0, 1}, {2, 3, 4}
    kept, record = ScoredPruner(cuts(small, large, extra={5: 0.1}), 6, 0.01)(frozenset(small | large | {5}))
    assert kept == frozenset(small), "elimination keeps whichever route is left; the exact search the smaller"
    assert record["objective"]["pruned"] <= record["objective"]["bound"]
    assert 5 in record["removed"]  # worth 0.1 of an improvement of 100.1: within the tolerance
    assert record["smaller_search"]["complete"]


def test_the_exact_search_finds_a_smaller_cut_that_elimination_walks_past():
    """The positional organism's seed 3, in small: a 4-unit cut {0, 1, 2, 3} and a 2-unit cut {4, 5},
    each unit of the large cut worth a little alone. Elimination removes 5 first (redundant while the
    large cut is whole) and is left with the large cut; every subset of sizes 1-3 is then scored."""
    large, small = {0, 1, 2, 3}, {4, 5}

    def j(units: FrozenSet[int]) -> float:
        value = -100.0 if large <= units or small <= units else -10.0 * len(units & large)
        return value - 0.1 * len(units & large) - (0.05 if 5 in units else 0.0)

    kept, record = ScoredPruner(j, 6, 0.01)(frozenset(large | small))
    assert record["elimination"][0]["removed"] == 4 and kept == frozenset(small)
    search = record["smaller_search"]
    assert search["replaced"] == sorted(large) and search["sizes"] == 2 and search["complete"]


@pytest.mark.e2e
def test_stable_pruning_drops_the_units_at_x_together_and_keeps_the_planted_heads(tmp_path):
    """The organism at [last,x], seed 4: the rounded mask holds the four planted heads at the final token
    and ten units at x. Unit by unit, elimination removed `L2.H1@last` and `L2.H4@last` first (each
    redundant while the heads at x are patched) and was left with four heads at x, which two swap rounds
    undid: 64,900 circuit x pair evaluations. Dropping the units at x together first: 13,500."""
    run_search(compose(*QUIET, "units.positions=[last,x]", "prune=stable", "seed=4"), tmp_path / "run")
    record = read_record(tmp_path / "run")
    assert sorted(record.names) == sorted(f"{head}@last" for head in PLANTED), record.names
    (dropped,) = record.pruning["by_position"]
    assert dropped["groups"] == ["x"] and len(dropped["removed"]) == 10
    assert record.pruning["swapped"] == {"out": [], "in": []}
    assert record.pruning["screening"]["pairs_scored"] < 30_000


@pytest.mark.parametrize("criterion", ["bound", "price"])
def test_dropping_a_position_keeps_the_cut_that_elimination_removes_first(criterion):
    """The organism at [last,x] (seed 4), in small: two cuts of one route, {0, 1} at the final token and
    twelve units at x. Unit by unit, elimination removes 0 first (every removal is free while both cuts
    are whole), then 1, and is left with the twelve, each needed; the exact search cannot score the pairs
    of 14 units. Keeping one position's units alone finds the final token's two at once."""
    last, x = {0, 1}, set(range(2, 14))
    positions = ["last"] * 2 + ["x"] * 12
    unit_by_unit = ScoredPruner(cuts(last, x), 14, 0.01, criterion=criterion)
    kept, record = unit_by_unit(frozenset(last | x))
    assert kept == frozenset(x) and record["by_position"] == []
    by_position = ScoredPruner(cuts(last, x), 14, 0.01, criterion=criterion, groupings=[positions])
    kept, record = by_position(frozenset(last | x))
    assert kept == frozenset(last)
    assert record["by_position"] == [{"groups": ["x"], "removed": sorted(x), "objective": -100.0}]
    assert [s["removed"] for s in record["elimination"]] == []  # each of the two is needed
    named = record | {"removed": [f"L0.H{u}@x" for u in sorted(x)], "put_in": [], "put_in_from_outside": []}
    line = pruning_line(named)
    assert "removed L0.H2@x, L0.H3@x" in line and "; first the units at x, together" in line
    one_position = ScoredPruner(cuts(last, x), 14, 0.01, criterion=criterion, groupings=[["last"] * 14])
    kept, record = one_position(frozenset(last | x))
    assert kept == frozenset(x) and record["by_position"] == []
    assert set(one_position.scored) == set(unit_by_unit.scored)  # nothing to drop: nothing more scored


def test_dropping_positions_takes_the_smallest_circuit_that_may_replace_the_one_in_hand():
    """Three positions: the units at `a` alone carry the answer, and so do those at `a` and `b` without
    `c`'s; keeping `a` alone (two units) comes before removing `c` (four left), in one step."""
    a, b, c = {0, 1}, {2, 3}, {4, 5}
    positions = ["a", "a", "b", "b", "c", "c"]
    kept, record = ScoredPruner(cuts(a), 6, 0.01, groupings=[positions])(frozenset(a | b | c))
    assert kept == frozenset(a)
    assert [step["groups"] for step in record["by_position"]] == [["b", "c"]]


def test_in_the_residual_stream_whole_layers_are_dropped_like_positions():
    """The organism over every token of the residual stream (seed 3), in small: x's two tokens at layer 0
    ({0, 1}) and seven tokens after x at layer 2 ({2, ..., 8}) are two cuts of one route, beside one more unit
    at layer 1 (9). Each position holds one unit of a cut, or two of different ones: dropping x's first token
    (0 and 9) leaves the large cut in hand, which only the exact search undoes. Keeping layer 0's units alone
    is one step."""
    small, large = {0, 1}, set(range(2, 9))
    positions = ["a", "b"] + [f"t{i}" for i in range(2, 9)] + ["a"]
    layers = ["layer 0"] * 2 + ["layer 2"] * 7 + ["layer 1"]
    circuit = frozenset(small | large | {9})
    by_position = ScoredPruner(cuts(small, large), 10, 0.01, criterion="price", groupings=[positions])
    kept, record = by_position(circuit)
    assert [step["groups"] for step in record["by_position"]] == [["a"]]
    assert kept == frozenset(small) and record["smaller_search"]["replaced"] == sorted(large)
    by_layer = ScoredPruner(cuts(small, large), 10, 0.01, criterion="price", groupings=[positions, layers])
    kept, record = by_layer(circuit)
    assert kept == frozenset(small) and record["elimination"] == []
    assert record["by_position"] == [
        {"groups": ["layer 1", "layer 2"], "removed": sorted(large | {9}), "objective": -100.0}
    ]
    assert len(by_layer.scored) < len(by_position.scored)


def test_the_groups_are_positions_and_in_the_residual_stream_layers_too():
    heads = ComponentSpace(2, 3, 4, positions=("x", "last"))
    assert unit_groupings(heads) == [[unit.position for unit in heads.units()]]
    resid = ComponentSpace(3, 3, 4, kind="residual", positions=("x", "last"))
    assert unit_groupings(resid) == [["x", "last"] * 3, ["layer 0"] * 2 + ["layer 1"] * 2 + ["layer 2"] * 2]


def test_the_exact_search_stops_at_its_budget_and_says_so():
    units = frozenset(range(10))
    kept, record = ScoredPruner(lambda c: -100.0 if len(c) >= 5 else -1.0, 10, 0.01)(units)
    assert len(kept) == 5
    # sizes 1 and 2 (10 + 45 subsets) fit within MAX_SMALLER = 64; size 3 (120 more) does not
    assert record["smaller_search"] == {"sizes": 2, "subsets": 55, "complete": False, "replaced": None}


def test_the_exact_search_is_skipped_when_only_single_units_fit():
    # 30 single units fit within MAX_SMALLER = 64, their 435 pairs do not: a 5-unit circuit is not
    # searched for one unit that does all (putting in has tried those that do most alone)
    pruner = ScoredPruner(lambda c: -100.0 if len(c) >= 5 else -1.0, 30, 0.01)
    kept, record = pruner(frozenset(range(30)))
    assert len(kept) == 5 and min(len(c) for c in pruner.scored if c) == 4  # elimination's, no single units
    assert record["smaller_search"] == {
        "sizes": 0,
        "subsets": 0,
        "complete": False,
        "skipped": "only single units fit within MAX_SMALLER (64)",
        "replaced": None,
    }


def test_pruning_puts_in_a_unit_the_search_left_out():
    """The positional organism's seed 3, in small: three paths to the output, {3, 0}, {4, 1} and {4, 2}
    (a set is a cut when it holds a unit of each). The rounded mask {0, 1, 2, 3} holds no cut smaller
    than three units; unit 4, which the search left out, makes a cut of two with 0 or 3. Attribution
    ranks unit 5 first (it does nothing here) and 4 second: both are tried."""
    paths = [{3, 0}, {4, 1}, {4, 2}]

    def j(units: FrozenSet[int]) -> float:
        return -100.0 * sum(bool(p & units) for p in paths) / len(paths)

    kept, record = ScoredPruner(j, 6, 0.01)(frozenset({0, 1, 2, 3}))
    assert len(kept) == 3 and record["put_in"] == []
    kept, record = ScoredPruner(j, 6, 0.01, ranked=[5, 4, 3, 2, 1, 0])(frozenset({0, 1, 2, 3}))
    assert len(kept) == 2 and 4 in kept and record["put_in"] == [4]


def test_the_exact_search_is_skipped_when_elimination_removed_nothing():
    # Every unit needed alone (removing any leaves the bound), as on SmolLM2 IOI: no choice to correct.
    units = frozenset(range(6))
    kept, record = ScoredPruner(lambda c: -10.0 * len(c), 6, 0.01)(units)
    assert kept == units and len(record["elimination"]) == 0
    assert record["smaller_search"]["skipped"] == "nothing was removed or put in"
    assert record["circuits_scored"] == 1 + 1 + 6  # nothing, the circuit, each unit left out: no subsets


def test_a_trial_of_putting_in_stops_once_it_cannot_remove_two_units():
    """The route {0, ..., 6} is needed whole; units 7 and 8 help a little and go, and attribution ranks them
    first outside the circuit, so each is tried back in. Seven units leave too many outcomes of a trial to score
    first (120 > MAX_SMALLER), so the trial runs; it is smaller only if two units go: once six of the route's
    units are shown needed alone, the seventh is not scored."""
    route = set(range(7))
    pruner = ScoredPruner(cuts(route, extra={7: 0.5, 8: 0.3}), 9, 0.01, ranked=[7, 8, *route])
    kept, record = pruner(frozenset(range(9)))
    assert kept == frozenset(route) and record["put_in"] == []
    assert [s["removed"] for s in record["elimination"]] == [8, 7]
    for unit in (7, 8):  # the trial with `unit` back: units 0-5 needed alone, unit 6 not scored
        assert set(range(6)) == {u for u in route if frozenset(route | {unit}) - {u} in pruner.scored}


def test_a_unit_put_in_is_tried_only_if_one_of_the_trials_outcomes_may_replace_the_circuit():
    """The route {0, 1, 2, 3} is needed whole; units 4 and 5 help a little and go, and are tried back in. A
    trial could end only in the unit with at most two of the route's units: 11 circuits. Scored in stages
    (prune=stable), these are screened on the first one, none is good enough, and no trial of elimination runs
    (at the organism's final token, whether a planted head may go once an MLP is in was a close call, scored on
    every validation pair). On one stage each would take every pair: the trial runs, and stops early."""
    route = frozenset({0, 1, 2, 3})
    trial_circuits = {unit: {(route | {unit}) - {u} for u in route} for unit in (4, 5)}
    for stages in (4, 1):
        pruner = ScoredPruner(cuts(route, extra={4: 0.5, 5: 0.3}), 6, 0.01, ranked=[4, 5, 0, 1, 2, 3])
        pruner.scores.stages = stages
        kept, record = pruner(frozenset(range(6)))
        assert kept == route and record["put_in"] == []
        for unit in (4, 5):
            outcomes = {frozenset({unit, *rest}) for size in range(3) for rest in itertools.combinations(route, size)}
            assert len(outcomes) == 11
            if stages > 1:
                assert outcomes <= set(pruner.scored) and not trial_circuits[unit] & set(pruner.scored)
            else:  # the trial: three of the route's units shown needed alone, the fourth not scored
                assert len(trial_circuits[unit] & set(pruner.scored)) == 3


def test_a_unit_put_into_a_circuit_of_two_is_tried_only_if_it_alone_may_replace_the_circuit():
    """The positional organism beside the final token, in small: the circuit is two units, 0 and 1, on two paths;
    unit 2, first in attribution's order, is another cut of 0's path. Put in, only unit 2 alone could be
    smaller than the circuit, and it is not: no trial of elimination is run (its first step, whether 0 may go
    beside 1 and 2, is a close call between two cuts of one route, on every pair at the organism)."""
    paths = [{0, 2}, {1}]

    def j(units: FrozenSet[int]) -> float:
        return -100.0 * sum(bool(p & units) for p in paths) / len(paths)

    pruner = ScoredPruner(j, 3, 0.01, ranked=[2, 0, 1], criterion="price")
    kept, record = pruner(frozenset({0, 1}))
    assert kept == frozenset({0, 1}) and record["put_in"] == []
    assert frozenset({2}) in pruner.scored
    assert not {frozenset({0, 1, 2}), frozenset({1, 2})} & set(pruner.scored)


def test_putting_a_removed_unit_back_swaps_a_route_for_a_smaller_one():
    """Unit 0 alone carries the answer; units 2 and 3 together nearly do. Removing 0 first looks least
    harmful, and elimination is then stuck with {2, 3}; put back (and kept), 0 lets both go."""
    table = {
        frozenset({0, 2, 3}): -100.4,
        frozenset({2, 3}): -99.9,
        frozenset({0, 3}): -99.6,
        frozenset({0, 2}): -99.6,
        frozenset({0}): -99.5,
        frozenset({2}): -50.0,
        frozenset({3}): -50.0,
        frozenset(): 0.0,
    }
    kept, record = ScoredPruner(table.__getitem__, 4, 0.01, ranked=[0, 1, 2, 3])(frozenset({0, 2, 3}))
    assert record["elimination"][0]["removed"] == 0  # the wrong first step
    assert kept == frozenset({0}) and record["put_in"] == [0]
    assert record["objective"]["pruned"] == -99.5 <= record["objective"]["bound"]


def small_helpers(units: FrozenSet[int]) -> float:
    """Units 0 and 1 carry -97 together; units 2-4 each lower J by 0.6 more (-98.8 with all five)."""
    return (-97.0 if {0, 1} <= units else -40.0 * len({0, 1} & units)) - 0.6 * len({2, 3, 4} & units)


def test_the_bound_keeps_small_helpers_that_together_exceed_it():
    kept, record = ScoredPruner(small_helpers, 5, 0.01)(frozenset(range(5)))
    assert {0, 1} < kept and len(kept) == 4, "J(0,1) = -97 lies 1.8 above the rounded mask, outside its 1% (0.99)"
    assert record["criterion"] == "bound" and "price" not in record["objective"]


def test_the_price_drops_every_unit_that_buys_less_than_its_share():
    kept, record = ScoredPruner(small_helpers, 5, 0.01, criterion="price")(frozenset(range(5)))
    assert kept == frozenset({0, 1}), "each helper lowers J by 0.6, less than the price (1% of 98.8)"
    assert record["objective"]["price"] == pytest.approx(0.988)
    assert "bound" not in record["objective"]
    named = record | {"removed": ["L0.H2"], "put_in": [], "put_in_from_outside": []}  # prune_one names the units
    assert "price 0.988 per unit" in pruning_line(named) and "stages" not in pruning_line(named)
    screened = named | {"screening": {"screen_pairs": 50, "circuits_on_every_pair": 3, "pairs_scored": 2500,
                                      "pairs_without_screening": 10000}}  # fmt: skip
    screened["objective"] = record["objective"] | {"pairs": 100}  # J(none), J(raw), J(pruned): the first stage's
    assert (
        f"scored in stages of 50 pairs: 3 of {record['circuits_scored']} circuits on every pair, 25%"
        in pruning_line(screened)
    )
    assert "objective on 100 pairs -98.8 (rounded mask)" in pruning_line(screened)


def test_the_price_keeps_a_unit_that_buys_more_than_its_share():
    def helpers(units):  # unit 2 now lowers J by 1.5: more than the price
        return small_helpers(units) - (0.9 if 2 in units else 0.0)

    kept, _ = ScoredPruner(helpers, 5, 0.01, criterion="price")(frozenset(range(5)))
    assert kept == frozenset({0, 1, 2})


def test_the_price_picks_the_cheapest_subset_over_every_size_in_the_exact_search():
    # two routes: {0, 1} at J -100 and the single unit 2 at -98.6; at the price 1 the pair costs -98, the
    # single unit -97.6, all three -97: both fit, and the exact search must not stop at the smallest size
    def routes(units):
        return min(-100.0 if {0, 1} <= units else 0.0, -98.6 if 2 in units else 0.0)

    pruner = ScoredPruner(routes, 3, 0.01, criterion="price")
    pruner.price = 1.0
    kept, search = pruner.smaller(frozenset({0, 1, 2}), frozenset({0, 1, 2}))
    assert kept == frozenset({0, 1}) and search["complete"]


def test_the_price_swaps_a_unit_for_one_that_completes_a_better_cut_of_the_same_size():
    # two cuts sharing unit 0: {0, 1} at J -100 and {0, 2} at -98; elimination may reach either
    def shared(units):
        return min(-100.0 if {0, 1} <= units else 0.0, -98.0 if {0, 2} <= units else 0.0)

    pruner = ScoredPruner(shared, 3, 0.01, criterion="price")
    pruner.price = 1.0
    assert pruner.swap(frozenset({0, 2}), frozenset({0, 1, 2})) == frozenset({0, 1})
    assert pruner.swap(frozenset({0, 1}), frozenset({0, 1, 2})) == frozenset({0, 1}), "no swap lowers J"


def test_under_the_price_the_exact_search_scores_the_swap_rounds_first_trials_in_its_batch():
    """A single unit at x and the swap trials that put it in beside a head at the final token share the run of x's
    tokens (engine=cached): the exact search scores those trials with its subsets, in one batch of masks."""

    class Batches(MadeUpScores):
        def __init__(self, objective):
            super().__init__(objective)
            self.batches = []

        def values(self, circuits, stage=1):
            self.batches.append(list(circuits))
            return super().values(circuits, stage)

    def two_heads(units):  # the pair {0, 1} is the route; unit 2 (at x) helps a little
        return -100.0 * len(units & {0, 1}) / 2 - (1.0 if 2 in units else 0.0)

    pruner = Pruner(Batches(two_heads), torch.zeros(3), 0.01, criterion="price")
    pruner.price = 1.5
    kept, search = pruner.smaller(frozenset({0, 1, 2}), frozenset({0, 1}))
    assert kept == frozenset({0, 1}) and search["subsets"] == 3
    singles, trials = [frozenset({u}) for u in range(3)], [frozenset({1, 2}), frozenset({0, 2})]
    assert pruner.scores.batches[0] == singles + trials
    assert pruner.swap(kept, frozenset({0, 1, 2})) == kept and pruner.scores.batches[-1][1:] == trials


def test_a_swap_that_only_ties_keeps_the_circuit_in_hand():
    def tied(units):  # {0, 2} and {1, 2} are cuts as good as each other
        return -100.0 if {0, 2} <= units or {1, 2} <= units else 0.0

    pruner = ScoredPruner(tied, 3, 0.01, criterion="price")
    pruner.price = 1.0
    assert pruner.swap(frozenset({1, 2}), frozenset({0, 1, 2})) == frozenset({1, 2})


def test_redundant_groups_join_the_pairs_needed_together():
    names = [type("U", (), {"name": n})() for n in ["a", "b", "c", "d"]]

    def left_out(groups):  # a and b back each other up; c and d too; nothing else matters
        needed = [set(g) in ({0, 1}, {2, 3}) or set(g) >= {0, 1} for g in groups]
        point = torch.tensor([10.0, 0.0])
        changes = torch.tensor([5.0 if n else 0.0 for n in needed])
        boot = changes[:, None] + torch.linspace(-0.1, 0.1, 50)[None]
        return point, boot, changes

    def judged(point, boot, changes, i):
        return {"objective_change": {"value": float(changes[i])}, "needed": bool(boot[i].min() > 0)}

    groups = redundant_groups([0, 1, 2, 3], names, left_out, judged)
    assert sorted(g["units"] for g in groups) == [["a", "b"], ["c", "d"]]
    assert redundant_groups([0], names, left_out, judged) == []


def test_the_path_ranks_the_circuit_first_then_by_the_largest_lambda_that_patches_a_unit():
    # Four units along a ladder of three lambdas (w < 0.5: patched).
    weights = torch.tensor(
        [
            [[0.0, 0.0, 0.2, 1.0]],  # lambda 0.01: units 0, 1, 2 patched
            [[0.0, 0.3, 1.0, 1.0]],  # lambda 0.1: units 0, 1
            [[0.4, 1.0, 1.0, 1.0]],  # lambda 1: unit 0
        ]
    )
    circuit = torch.tensor([[1.0, 0.0, 1.0, 1.0]])  # the run reports unit 1 alone
    scores = path_scores(weights, [0.01, 0.1, 1.0], circuit)
    assert scores.flatten().argsort(descending=True).tolist() == [1, 0, 2, 3]
    assert scores.max() == 1.0 and scores.min() > 0


def test_the_units_no_lambda_patches_come_last_in_the_order_of_the_tail_scores():
    weights = torch.tensor([[[0.0, 1.0, 1.0, 1.0, 0.9]], [[0.2, 1.0, 1.0, 1.0, 1.0]]])  # only unit 0 patched
    circuit = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    tail = torch.tensor([[9.0, 0.1, 3.0, -2.0, 0.5]])  # attribution: 2, then 4, 1, 3
    scores = path_scores(weights, [0.01, 0.1], circuit, tail=tail)
    assert scores.flatten().argsort(descending=True).tolist() == [0, 2, 4, 1, 3]
    # Without it, the tail goes by 1 - w at the smallest lambda: unit 4 (w 0.9) first, then by index.
    assert path_scores(weights, [0.01, 0.1], circuit).flatten().argsort(descending=True, stable=True).tolist()[:2] == [
        0,
        4,
    ]


@pytest.mark.parametrize("gate", [ClampGate(), SigmoidGate(), HardConcreteGate(seed=3)])
def test_every_gate_gives_weights_in_the_unit_interval_and_a_deterministic_end(gate):
    params = gate.init(2, (3, 5), torch.device("cpu"))
    params = params + torch.randn(params.shape, generator=torch.Generator().manual_seed(0))
    gate.project(params)
    for progress in (0.0, 0.5, 1.0):
        w = gate.weights(params, progress)
        assert w.shape == (2, 3, 5) and bool(((0 <= w) & (w <= 1)).all())
    assert torch.equal(gate.final(params), gate.final(params))
    assert gate.penalty(params, 0.5).shape == (2,)


def test_the_hard_concrete_draws_repeat_with_the_seed():
    first, second = HardConcreteGate(seed=1), HardConcreteGate(seed=1)
    p1, p2 = first.init(1, (2, 2), torch.device("cpu")), second.init(1, (2, 2), torch.device("cpu"))
    assert torch.equal(first.weights(p1, 0.0), second.weights(p2, 0.0))


def test_make_gate_follows_the_config():
    cfg = OmegaConf.create({"gate": "sigmoid", "temperature": [2.0, 0.1], "eps": 1e-3})
    assert make_gate(cfg) == SigmoidGate(temperature=(2.0, 0.1))
    assert make_gate(OmegaConf.merge(cfg, {"gate": "clamp"})) == ClampGate(1e-3)


@pytest.mark.parametrize("gate", ["sigmoid", "hard_concrete"])
def test_the_other_gates_find_the_planted_circuit_with_pruning(gate, tmp_path):
    (record,) = run_search(compose(*QUIET, f"optimizer.gate={gate}", "optimizer.lr=0.1"), tmp_path / "run")
    assert set(record.names) <= set(PLANTED) and len(record.names) >= 3


def test_pruning_on_an_accelerator_scores_as_many_circuits_at_once_as_its_free_memory_holds(monkeypatch):
    """Each circuit scored holds its own copy of the batch's keys and values: 64 at once would not fit beside
    LLaMA-13B on an 80 GB GPU (about 2.4 GiB each for 50 pairs of 25 tokens)."""
    space = ComponentSpace(40, 40, 128, positions=("x", "last"), mlp_width=13824)
    config = tf.LlamaConfig(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824)
    per_circuit = 50 * 25 * (4 * 40 * 40 * 128 * 2 + (8 * 5120 + 4 * 13824 + 40 * 25) * 4)  # 2.36 GiB

    def chunk(free_gib: float) -> int:
        return scoring_chunk(SimpleNamespace(space=space), config, torch.float16, 50, 25, int(free_gib * GIB), 64)

    assert chunk(48) == int(48 * GIB / 2 / per_circuit) == 10  # within half of what is free
    assert chunk(1000) == 64 and chunk(1) == 1  # at most MASK_CHUNK, at least one
    job = Job(compose("+desiderata=vd_oi", "progress=false", "plots=false", "units.positions=[last,x]"))
    validation = job.objectives("validation")
    monkeypatch.setattr(prune, "free_memory", lambda device: 10 * GIB)
    assert device_chunk(job.engine, validation) == 64  # the organism: small
    monkeypatch.setattr(prune, "free_memory", lambda device: 2**20)
    assert device_chunk(job.engine, validation) == 1
