"""A whole search with a lambda ladder (optimizer.path_lams): every unit ranked, for MIB's curves
(methods/ranking.py wired in runs/train.py), on the organism whose circuit is planted."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from circuitfind.methods.baselines import attribution_scores
from circuitfind.runs.job import Job
from circuitfind.runs.train import run_search

from conftest import compose

PLANTED = ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]
LADDER = "optimizer.path_lams=[0.003,0.03,1.0]"


@pytest.mark.e2e  # one search with three more lambdas beside it: about 30 s on 2 cores
def test_a_search_with_a_lambda_ladder_ranks_every_unit_circuit_first(tmp_path):
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
    # the units no lambda of the ladder patches come last, in the order of attribution's scores
    job = Job(cfg)
    tail = attribution_scores(job.engine, job.objectives(), job.engine.device).flatten()
    last = [i for i in scores.argsort(descending=True, stable=True).tolist() if names[i] not in PLANTED][-10:]
    assert all(weights[i] > 0.5 for i in last)
    assert tail[last].tolist() == sorted(tail[last].tolist(), reverse=True)
