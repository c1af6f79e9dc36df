"""One `circuitfind eval`: a config (a run's own, or composed), the job, its self-checks, the
circuit's tests (evaluation/circuit_tests.py), eval.json and the report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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
from circuitfind.records.circuit import RECORD_FILE, read_record
from circuitfind.records.circuit_source import CircuitUnderTest, read_circuit
from circuitfind.records.evaluation import EVAL_FILE
from circuitfind.records.report import build_report
from circuitfind.records.rundir import load_config, owned, unique_dir
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
    out_dir: Path | None,
    overrides: List[str],
    run: Path | None,
    circuit: Any,
    models: Dict[str, LoadedModel] | None = None,
) -> Evaluated:
    """Evaluate a circuit and write eval.json and the report; returns where they went.

    `run`: a finished run directory (its config, and its circuit unless `circuit` is given); otherwise
    the config is composed from `overrides` as `circuitfind train` composes it. `models` keeps loaded
    models by their config, so that the runs of a sweep load the model once.

    Where it goes (`out_dir` None): a run's own circuit into the run's directory, any other circuit into
    a new `outputs/eval/<date>/<time>`: a run directory never holds the tests of a circuit it did not
    find. An `out_dir` that holds a finished run whose circuit this is not is refused with one line.
    An earlier eval.json there is kept as eval.<n>.json, and the log says so.
    """
    cfg = run_config(run, overrides) if run is not None else compose_train_config(overrides)
    models = {} if models is None else models
    key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    job = Job(cfg, loaded=models.get(key))
    models[key] = job.loaded
    splits = job.eval_splits()
    checks = job.self_checks()
    spec = circuit if circuit is not None else str(run)
    under_test = read_circuit(spec, job.space)
    out_dir = destination(out_dir, run, under_test)
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
    with owned(out_dir, "--out"):
        kept = keep_earlier(out_dir / EVAL_FILE)
        path = write_evaluation(out_dir, result)
        replaced = [name for name in ("report.html", "report.md") if (out_dir / name).is_file()]
        html, md = build_report(out_dir)
    if kept:
        log.info(f"{out_dir} held an earlier evaluation: kept as {kept.name}")
    if replaced:
        log.info(f"the report ({', '.join(replaced)}) was written anew, with this evaluation")
    return Evaluated(path, html, md)


@dataclass
class Evaluated:
    """Where one evaluation went."""

    eval_json: Path
    report_html: Path
    report_md: Path


def own_circuit(run: Path, circuit: CircuitUnderTest) -> bool:
    """Whether a circuit is the one a finished run reports."""
    return sorted(read_record(run).names) == sorted(circuit.names)


def destination(out_dir: Path | None, run: Path | None, circuit: CircuitUnderTest) -> Path:
    """Where an evaluation goes: see evaluate_to."""
    if out_dir is None:
        if run is not None and own_circuit(run, circuit):
            return Path(run)
        out = unique_dir(Path("outputs/eval"))
        if run is not None:
            log.info(f"{', '.join(circuit.names)} is not the circuit {run} found: the evaluation goes to {out}")
        return out
    out_dir = Path(out_dir)
    if (out_dir / RECORD_FILE).is_file() and not own_circuit(out_dir, circuit):
        found = ", ".join(read_record(out_dir).names) or "nothing"
        raise CircuitfindError(
            f"--out {out_dir} holds a finished run whose circuit is {found}, not this one; its eval.json must stay "
            "that circuit's: give another --out (or none: outputs/eval/<date>/<time>)"
        )
    return out_dir


def keep_earlier(path: Path) -> Path | None:
    """Move an existing file aside as <stem>.<n><suffix> (the first free n); returns its new path."""
    if not path.is_file():
        return None
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)
    return kept
