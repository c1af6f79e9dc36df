"""Ground truth beyond the final position: the positional organism (model=organism_positional), whose
circuit is planted at the query's mention of x (`xname#2`), and stability over seeds in every space
that has a planted circuit."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from circuitfind.model.checkpoint import ASSETS
from circuitfind.records.circuit import read_record
from circuitfind.runs.train import run_search

from conftest import compose

PLANTED_HEADS = ["L1.H1", "L1.H2", "L1.H3", "L1.H6"]
AT_XNAME2 = [f"{head}@xname#2" for head in PLANTED_HEADS]
QUIET = ("+desiderata=vd_oi", "progress=false", "plots=false")
POSITIONAL = ("model=organism_positional", 'units.positions=["xname#2"]')


def test_the_card_names_the_planted_heads_and_their_position():
    meta = AutoConfig.from_pretrained(ASSETS / "organism_positional").circuitfind
    assert meta["planted_circuit"] == PLANTED_HEADS and meta["planted_position"] == "xname#2"
    card = (ASSETS / "organism_positional" / "README.md").read_text()
    assert all(head in card for head in PLANTED_HEADS) and "xname#2" in card


@pytest.fixture(scope="module")
def positional_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("positional") / "run"
    run_search(compose(*QUIET, *POSITIONAL), run_dir)
    return run_dir


def test_the_search_at_the_planted_position_finds_exactly_the_planted_heads(positional_run):
    record = read_record(positional_run)
    assert sorted(record.names) == AT_XNAME2, record.names
    assert record.planted["precision"] == record.planted["recall"] == 1.0
    # the planted heads move x on 80% (-) to 97% (*) of interchanges (the card), so the circuit's own
    # held-out VD is 0.86 here: it is the planted circuit's accuracy, not a search's shortfall
    assert record.metrics["vd_test/acc"] >= 0.8 and record.metrics["oi_test/acc"] >= 0.95, record.metrics
    assert record.raw["n_patched"] >= len(AT_XNAME2), "pruning starts from DBM's rounded mask"


def test_every_planted_head_is_needed_alone(positional_run):
    ev = json.loads((positional_run / "eval.json").read_text())
    assert ev["minimality"]["not_needed"] == [] and ev["minimality"]["redundant_groups"] == []


SPACES_WITH_A_PLANTED_CIRCUIT = {
    "organism, final token": (),
    'organism, [last,x,"xname#2"]': ('units.positions=[last,x,"xname#2"]',),
    "positional organism, xname#2": POSITIONAL,
}


@pytest.mark.e2e
@pytest.mark.parametrize("space", list(SPACES_WITH_A_PLANTED_CIRCUIT))
def test_five_seeds_find_the_same_circuit(space, tmp_path):
    overrides = (*QUIET, *SPACES_WITH_A_PLANTED_CIRCUIT[space], "evidence.stability_seeds=5")
    run_search(compose(*overrides), tmp_path / "run")
    stability = json.loads((tmp_path / "run" / "evidence.json").read_text())["stability"]
    assert stability["seeds"] == [0, 1, 2, 3, 4]
    assert stability["mean_pairwise_jaccard"] >= 0.9, stability


BESIDE_THE_FINAL_TOKEN = {
    '["xname#2",last]': ('units.positions=["xname#2",last]',),
    '[last,x,"xname#2"]': ('units.positions=[last,x,"xname#2"]',),
}


@pytest.mark.e2e
@pytest.mark.parametrize("space", list(BESIDE_THE_FINAL_TOKEN))
def test_stable_pruning_finds_one_cut_in_five_seeds_beside_the_final_token(space, tmp_path):
    """Beside the final token, `L2.H1@last` with `L2.H6@last` and `L0.H6@x` with `L2.H6@last` (and, at
    ["xname#2",last], `L1.H2@xname#2` with `L2.H6@last`) are cuts of one route within 1-2% of each other.
    The default's bound and 50 validation pairs give Jaccard 0.87 and 0.73 over five seeds; prune=stable
    (a price per unit, whole positions first, swaps, 400 pairs scored in stages from 50) gives the best
    pair, the same in every seed, while scoring a fraction of what every circuit on every pair would take."""
    overrides = (*QUIET, "model=organism_positional", *BESIDE_THE_FINAL_TOKEN[space], "prune=stable")
    run_search(compose(*overrides, "evidence.stability_seeds=5"), tmp_path / "run")
    record = read_record(tmp_path / "run")
    assert sorted(record.names) == ["L2.H1@last", "L2.H6@last"], record.names
    assert record.pruning["criterion"] == "price" and record.config["task"]["n_validation"] == 400
    screening = record.pruning["screening"]
    assert screening["stages"] == 4 and screening["pairs_scored"] < screening["pairs_without_screening"] / 2
    stability = json.loads((tmp_path / "run" / "evidence.json").read_text())["stability"]
    assert stability["mean_pairwise_jaccard"] == 1.0, stability


@pytest.mark.e2e
def test_pruning_puts_in_a_unit_of_the_smallest_cut_that_the_search_left_out(tmp_path):
    """Beside the final token this organism has cuts of two units: `L2.H6@last` with `L0.H6@x` (or with
    `L2.H1@last`). At seed 3 DBM's rounded mask holds neither `L2.H6@last` nor any cut smaller than five
    units; pruning puts it in and keeps the pair."""
    space = ("model=organism_positional", 'units.positions=[last,x,"xname#2"]', "seed=3")
    run_search(compose(*QUIET, *space), tmp_path / "run")
    record = read_record(tmp_path / "run")
    assert "L2.H6@last" not in record.raw["circuit"]
    assert sorted(record.names) == ["L0.H6@x", "L2.H6@last"], record.names
    assert record.pruning["put_in_from_outside"] == ["L2.H6@last"]
