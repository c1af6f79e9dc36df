"""One `circuitfind eval`: a config (a run's own, or composed), the job, its self-checks, the
circuit's tests (evaluation/circuit_tests.py), eval.json and the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig, OmegaConf

from circuitfind.config.compose import compose_train_config
from circuitfind.config.schema import TrainConfig
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.bootstrap import as_pair, rounded
from circuitfind.evaluation.heldout import evaluate_splits
from circuitfind.model.loading import LoadedModel
from circuitfind.records.circuit import read_record
from circuitfind.records.circuit_source import CircuitUnderTest, read_circuit
from circuitfind.records.rundir import load_config
from circuitfind.records.writer import write_evaluation
from circuitfind.runs.job import Job
from circuitfind.task.pairs import data_fingerprint

log = logging.getLogger(__name__)
GROUPS = ("model", "task", "desiderata", "optimizer", "logger", "method", "evidence", "experiment")


def run_config(run: Path, overrides: List[str]) -> DictConfig:
    """The config a finished run was made with, with key=value changes (task.n_test=500)."""
    groups = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in GROUPS]
    if groups:
        raise CircuitfindError(
            f"{groups[0]!r} chooses a new config group, and a run directory brings its own config; change its keys "
            f"instead ({groups[0].lstrip('+~').split('=')[0]}.<key>=...), or evaluate its circuit in a new config: "
            f"circuitfind eval {groups[0]} circuit={run}"
        )
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), load_config(run))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return cfg


def circuit_metrics(job: Job, splits, circuit: CircuitUnderTest) -> Dict[str, Any]:
    """The paper's held-out metrics of the circuit patched from the alternates, with 95% intervals."""
    mask = (~circuit.members).float()[None].to(job.device)
    intervals: Dict[str, torch.Tensor] = {}
    metrics = evaluate_splits(splits, job.engine, mask, intervals=intervals)
    return {
        "metrics": {key: rounded(v[0]) for key, v in metrics.items()},
        "metrics_ci": {key: as_pair(v[0]) for key, v in intervals.items()},
    }


def evaluate_to(
    out_dir: Path,
    overrides: List[str],
    run: Path | None,
    circuit: Any,
    models: Dict[str, LoadedModel] | None = None,
) -> Path:
    """Evaluate a circuit and write eval.json (and the report) into out_dir; returns eval.json's path.

    `run`: a finished run directory (its config, and its circuit unless `circuit` is given); otherwise
    the config is composed from `overrides` as `circuitfind train` composes it. `models` keeps loaded
    models by their config, so that the runs of a sweep load the model once.
    """
    from circuitfind.records.report import build_report

    cfg = run_config(run, overrides) if run is not None else compose_train_config(overrides)
    models = {} if models is None else models
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    job = Job(cfg, loaded=models.get(key))
    models[key] = job.loaded
    splits = job.eval_splits()
    checks = job.self_checks()
    spec = circuit if circuit is not None else str(run)
    under_test = read_circuit(spec, job.space)
    if run is not None and not overrides:
        recorded = read_record(run).data.get("fingerprint")
        if recorded and recorded != data_fingerprint(job.data):
            log.warning(
                f"{run}: the pairs drawn now differ from the run's (data fingerprint {data_fingerprint(job.data)} "
                f"against {recorded}); the task's generator changed since the run, so these figures are not the run's"
            )
    evaluation = job.circuit_evaluation(splits)
    evaluation.check_reference()
    result = evaluation(under_test) | job.provenance() | circuit_metrics(job, splits, under_test) | {"checks": checks}
    path = write_evaluation(Path(out_dir), result)
    build_report(Path(out_dir))
    return path
