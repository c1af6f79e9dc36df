"""A whole search with a lambda ladder (optimizer.path_lams): every unit ranked, for MIB's curves
(methods/ranking.py wired in runs/train.py), on the organism whose circuit is planted."""

from __future__ import annotations

import json
from typing import List

import pytest
import torch
from safetensors import safe_open

from circuitfind.evaluation import restoring
from circuitfind.evaluation.ablation import Ablation
from circuitfind.evaluation.circuit_tests import outcomes, split_report
from circuitfind.evaluation.heldout import prepare_split
from circuitfind.evaluation.restoring import restoring_gains, restoring_order
from circuitfind.methods.baselines import attribution_scores
from circuitfind.records.circuit_source import from_names
from circuitfind.runs import train
from circuitfind.runs.job import Job
from circuitfind.runs.train import run_search

from conftest import compose

PLANTED = ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]
LADDER = "optimizer.path_lams=[0.003,0.03,1.0]"


@pytest.mark.e2e  # one search with three more lambdas beside it: about 30 s on 2 cores
def test_a_search_with_a_lambda_ladder_ranks_every_unit_circuit_first(tmp_path, monkeypatch):
    tails = []

    def recorded(*args, **kwargs):
        tails.append((args[2], restoring_order(*args, **kwargs)))  # (head, tail scores)
        return tails[-1][1]

    monkeypatch.setattr(train, "restoring_order", recorded)
    cfg = compose("+desiderata=vd_oi", LADDER, "progress=false", "plots=false")
    run_search(cfg, tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "mask.safetensors"), "pt") as f:
        names = json.loads(f.metadata()["names"])
        scores, weights = f.get_tensor("scores").flatten(), f.get_tensor("continuous").flatten()
    order = [names[i] for i in scores.argsort(descending=True, stable=True).tolist()]
    assert sorted(order[:4]) == PLANTED  # the run's circuit first
    assert len(set(scores.tolist())) == len(names)  # a strict order of every unit
    circuit = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert circuit["method"]["name"] == "dbm" and sorted(row["name"] for row in circuit["circuit"]) == PLANTED
    # the units no lambda of the ladder patches come last, in the order of what each restores under mean ablation
    ((head, tail),) = tails
    head, tail = head.flatten(), tail.flatten()
    n_head = int(head.sum())
    assert 4 <= n_head < len(names) - 10 and bool(head[[names.index(u) for u in PLANTED]].all())
    ranked = scores.argsort(descending=True, stable=True)
    assert bool(head[ranked[:n_head]].all())
    assert ranked[n_head:].tolist() == tail.argsort(descending=True, stable=True)[: len(names) - n_head].tolist()
    assert all(weights[i] > 0.5 for i in ranked[n_head:].tolist())


@pytest.fixture(scope="module")
def organism():
    """The organism's job, its training pairs as splits, the mean ablation, and its planted circuit kept."""
    job = Job(compose("+desiderata=vd_oi", "progress=false", "plots=false"))
    objectives = job.objectives()
    train = [prepare_split(o.desideratum, "train", o.batches, job.engine) for o in objectives]
    names = job.space.names()
    head = torch.tensor([name in PLANTED for name in names]).view(job.space.shape)
    return job, objectives, train, Ablation("mean", job.reference(), 0), head


def faithfulness_kept(job, split, kept: List[str], mean) -> float:
    """The split's faithfulness with `kept` alone unablated: circuit_tests' sufficiency condition."""
    circuit = from_names(kept, job.space)
    return split_report(split, job.engine, circuit, mean, seed=0)["sufficiency"]["faithfulness"]["value"]


def test_a_units_restoring_gain_is_how_much_closer_to_1_keeping_it_brings_each_desideratums_faithfulness(organism):
    job, _, train, mean, head = organism
    names = job.space.names()
    candidates = [names.index("L3.MLP"), names.index("L0.H0")]
    ends = [(s, outcomes(s, job.engine, torch.zeros(1, *head.shape), mean)["d"].double().mean(1)) for s in train]
    gains = restoring_gains(job.engine, ends, head.flatten().nonzero().flatten().tolist(), candidates, mean)
    for unit, gain in zip(candidates, gains.tolist()):
        before = [faithfulness_kept(job, s, PLANTED, mean) for s in train]
        after = [faithfulness_kept(job, s, [*PLANTED, names[unit]], mean) for s in train]
        expected = sum(abs(1 - b) - abs(1 - a) for b, a in zip(before, after))
        assert gain == pytest.approx(expected, abs=2e-3)  # the report rounds faithfulness to 3 decimals


def test_the_units_outside_the_head_are_ordered_block_by_block_up_to_mibs_budgets(organism):
    job, objectives, train, mean, head = organism
    engine, n = job.engine, head.numel()
    ties = attribution_scores(engine, objectives, engine.device).cpu()
    scores = restoring_order(engine, train, head, ties, mean, seed=0).flatten()
    assert bool((scores[head.flatten()] == 0).all())  # the head is ranked by the path, not here
    tail = scores.argsort(descending=True, stable=True).tolist()[:-4]
    assert len(set(scores[tail].tolist())) == n - 4 and bool((scores[tail] > 0).all())  # a strict order of the rest
    ends = [(s, outcomes(s, engine, torch.zeros(1, *head.shape), mean)["d"].double().mean(1)) for s in train]
    # MIB's budgets past the head's 4 units: 5, 10, 20, 36. The first block is the best gain from the head alone,
    rest = [u for u in range(n) if not head.flatten()[u]]
    planted = head.flatten().nonzero().flatten().tolist()
    gain = restoring_gains(engine, ends, planted, rest, mean)
    assert tail[:1] == [rest[int(gain.argmax())]]
    # the next five are scored again with it kept as well,
    rest = [u for u in rest if u not in tail[:1]]
    gain = restoring_gains(engine, ends, [*planted, *tail[:1]], rest, mean)
    assert tail[1:6] == [rest[i] for i in gain.argsort(descending=True, stable=True)[:5].tolist()]
    # and keeping these six restores the model better than attribution's first six (the order they replaced)
    names = job.space.names()
    by_attribution = [u for u in ties.flatten().argsort(descending=True, stable=True).tolist() if not head.flatten()[u]]
    missing = {
        label: sum(abs(1 - faithfulness_kept(job, s, [*PLANTED, *(names[u] for u in units[:6])], mean)) for s in train)
        for label, units in (("restoring", tail), ("attribution", by_attribution))
    }
    assert missing["restoring"] < missing["attribution"] - 0.2, missing


def test_without_a_desideratum_whose_logit_difference_moves_the_rest_keep_the_order_of_the_ties(organism, monkeypatch):
    job, _, train, mean, head = organism
    monkeypatch.setattr(restoring, "undefined_areas", lambda d, seed: "d(full) - d(empty) includes 0")
    ties = torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
    scores = restoring_order(job.engine, train, head, ties, mean, seed=0).flatten()
    rest = [u for u in ties.flatten().argsort(descending=True).tolist() if not head.flatten()[u]]
    assert scores.argsort(descending=True, stable=True).tolist()[:-4] == rest
