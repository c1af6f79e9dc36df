"""optimizer.target_size: the lambda whose circuit has exactly k units."""

from __future__ import annotations

import math

import pytest

from circuitfind.config.validation import validate
from circuitfind.errors import CircuitfindError
from circuitfind.methods.target_size import log_grid, search_lambda
from circuitfind.runs.job import Job
from circuitfind.runs.train import run_search

from conftest import compose

QUIET = ("+desiderata=vd_oi", "progress=false", "plots=false")


def shrinking(calls: list):
    """A circuit that shrinks with lambda as DBM's does: 30 units at lambda 0.001, none at 10."""

    def sizes_of(lams):
        calls.append(list(lams))
        return [max(0, round(30 - 8 * (math.log10(lam) + 3))) for lam in lams]

    return sizes_of


def test_the_search_narrows_the_bracket_until_a_lambda_gives_the_size():
    calls: list = []
    search = search_lambda(shrinking(calls), 11, [0.001, 10.0], per_round=4, rounds=6)
    assert search.found is not None and dict(search.tried)[search.found] == 11
    assert len(calls) >= 2 and all(len(c) == 4 for c in calls)  # several lambdas side by side, per round
    first, second = calls[0], calls[1]
    assert first == log_grid(0.001, 10.0, 4) and first[0] < min(second) and max(second) < first[-1]
    assert search.record()["reached"] and search.record()["lam"] == search.found


def test_a_size_no_lambda_reaches_is_reported_with_the_nearest_sizes():
    search = search_lambda(lambda lams: [40 if lam < 0.1 else 2 for lam in lams], 10, [0.001, 10.0], 4, 3)
    record = search.record()
    assert not record["reached"] and record["nearest_larger"][1] == 40 and record["nearest_smaller"][1] == 2
    assert "no lambda tried gives it; nearest: 40 units at" in search.summary()
    calls: list = []
    out_of_range = search_lambda(shrinking(calls), 35, [0.001, 10.0], 4, 5)  # 30 units at 0.001: look lower
    assert min(calls[1]) == pytest.approx(1e-6) and max(calls[1]) < 0.001
    assert out_of_range.found is not None and dict(out_of_range.tried)[out_of_range.found] == 35
    never = search_lambda(lambda lams: [3 for _ in lams], 10, [0.001, 10.0], 4, 2)
    assert never.record()["nearest_larger"] is None and "nearest: 3 units at λ=1e-06" in never.summary()


@pytest.mark.e2e
def test_target_size_finds_the_planted_circuit_on_the_organism(tmp_path):
    records = run_search(compose(*QUIET, "optimizer.target_size=4"), tmp_path / "run")
    record = records[0]
    assert record.n_patched == 4 and sorted(record.names) == ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]
    search = record.lambda_search
    assert search["reached"] and search["target_size"] == 4 and record.lam == search["lam"]
    assert [lam for lam, size in search["tried"] if size == 4][0] == search["lam"]
    assert "target_search_s" in record.timing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("optimizer.target_size=40",), "optimizer.target_size=40 is more than the model's 36 units"),
        (("optimizer.target_size=3", "optimizer.lams=[0.1,0.2]"), "needs method=dbm and no optimizer.lams"),
        (("optimizer.target_size=3", "optimizer.target_range=[1.0,0.1]"), "0 < low < high"),
    ],
)
def test_impossible_target_sizes_are_one_line(overrides, message):
    with pytest.raises(CircuitfindError, match=message) as e:
        cfg = compose(*QUIET, *overrides)
        validate(cfg)
        Job(cfg)
    assert "\n" not in str(e.value)
