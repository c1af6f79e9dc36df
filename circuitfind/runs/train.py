"""One `circuitfind train` run, top to bottom: job, masks, held-out metrics, evidence, records.

job       the config made into data, a loaded model, an engine and prepared pairs
masks     K masks trained side by side by DBM (one per lambda), or a baseline's top k
metrics   every mask, rounded, on the held-out and transfer pairs of every desideratum
evidence  baselines, curves and stability, when `evidence` asks for them
records   per lambda: mask.safetensors, exports, figures, then circuit.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from circuitfind.config.schema import wants_evidence
from circuitfind.errors import CircuitfindError, out_of_memory_hint
from circuitfind.evaluation.bootstrap import as_pair
from circuitfind.evaluation.evidence import gather_evidence
from circuitfind.evaluation.heldout import (
    EvalSplit,
    baseline_intervals,
    baseline_of,
    evaluate_splits,
    low_baseline_warnings,
)
from circuitfind.methods.dbm import NonFiniteLoss, OnStep, round_mask, train_mask
from circuitfind.methods.objective import Objective
from circuitfind.methods.registry import method_named
from circuitfind.methods.target_size import LambdaSearch, search_lambda
from circuitfind.records.circuit import CircuitRecord
from circuitfind.records.sweep import write_summary
from circuitfind.records.tracking import Tracker
from circuitfind.records.writer import RunWriter, SearchResult
from circuitfind.runs.job import Job
from circuitfind.runs.result import RunFacts, attention_figure, circuit_of, make_record, unit_figures

log = logging.getLogger(__name__)


class Interrupted(CircuitfindError):
    """Ctrl-C during training: the message says at which step, and where the last mask is."""

    exit_code = 130


def lambdas(cfg: DictConfig) -> List[float]:
    """The sparsity weights to train: optimizer.lams (K masks at once) or optimizer.lam."""
    return [float(v) for v in cfg.optimizer.lams] if cfg.optimizer.lams else [float(cfg.optimizer.lam)]


def find_masks(
    job: Job, objectives: Sequence[Objective], lams: List[float], on_step: OnStep
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K masks of this run, as its method finds them, and the ranking of the units each comes
    from (higher = more important). (K, L, n_cols) each"""
    return method_named(job.cfg.method.name).find(job.engine, objectives, lams, job.cfg, on_step)


class StepLog:
    """Per training step: every mask's losses, and its held-out accuracy every `eval_every` steps."""

    def __init__(self, job: Job, splits: Sequence[EvalSplit], writer: RunWriter, k: int):
        self.job, self.splits, self.writer = job, splits, writer
        self.histories: List[List[Dict[str, float]]] = [[] for _ in range(k)]
        self.last_mask: torch.Tensor | None = None  # after the last completed step (K, L, H+1)
        self.steps_done = 0

    def __call__(self, step: int, mask: torch.Tensor, logs: Dict[str, torch.Tensor]) -> None:
        self.last_mask, self.steps_done = mask.clone(), step + 1
        o = self.job.cfg.optimizer
        rows = [{key: float(v[k]) for key, v in logs.items()} for k in range(len(self.histories))]
        if (step + 1) % o.eval_every == 0 or step + 1 == o.steps:
            accs = held_out_accuracy(self.job, self.splits, round_mask(mask))
            for k, row in enumerate(rows):
                row |= {key: float(v[k]) for key, v in accs.items()}
        self.writer.log_step(step, rows)
        for history, row in zip(self.histories, rows):
            history.append({"step": step, **row})


@torch.no_grad()
def held_out_accuracy(
    job: Job, splits: Sequence[EvalSplit], mask: torch.Tensor, intervals: Dict[str, torch.Tensor] | None = None
) -> Dict[str, torch.Tensor]:
    """Accuracy of each mask on the held-out test splits. {key: (K,)}; with `intervals`, theirs go in it."""
    every: Dict[str, torch.Tensor] = {}
    metrics = evaluate_splits(splits, job.engine, mask, kinds=("test",), intervals=every)
    keys = [split.key("acc") for split in splits if split.kind == "test"]
    if intervals is not None:
        intervals |= {key: every[key] for key in keys}
    return {key: metrics[key] for key in keys}


def results_of(
    job: Job, splits, mask: torch.Tensor, scores: torch.Tensor, lams: List[float], histories
) -> List[SearchResult]:
    """Each mask's held-out metrics with their 95% intervals, rounded (and, for accuracy, continuous).
    mask, scores (K, L, H+1)"""
    rounded = round_mask(mask)
    intervals: Dict[str, torch.Tensor] = {}
    continuous_intervals: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        final = evaluate_splits(splits, job.engine, rounded, intervals=intervals)
        continuous = held_out_accuracy(job, splits, mask, continuous_intervals)
    return [
        SearchResult(
            lam=lam if method_named(job.cfg.method.name).learns_mask else None,  # a ranking has no sparsity weight
            mask=mask[k],
            rounded=rounded[k],
            scores=scores[k],
            metrics={key: float(v[k]) for key, v in final.items()}
            | {f"continuous/{key}": float(v[k]) for key, v in continuous.items()},
            metrics_ci={key: as_pair(v[k]) for key, v in intervals.items()}
            | {f"continuous/{key}": as_pair(v[k]) for key, v in continuous_intervals.items()},
            history=histories[k],
        )
        for k, lam in enumerate(lams)
    ]


class Run:
    """One search on a built job: everything that can fail on bad input happens in __init__,
    before `execute` writes anything into the run directory."""

    def __init__(self, job: Job):
        self.job = job
        with out_of_memory_hint(
            "while preparing the batches; set optimizer.batch_size smaller (e.g. optimizer.batch_size=8) "
            "or cache=cpu / cache=recompute"
        ):
            self.splits = job.eval_splits()
            self.objectives = job.objectives()
        self.checks = job.self_checks()
        self.evaluation = job.circuit_evaluation(self.splits)
        self.evaluation.check_reference()  # too few prompts for a mean ablation stops the run here
        self.baseline = baseline_of(self.splits)
        self.warnings = low_baseline_warnings(self.splits, self.baseline, job.cfg.min_baseline_acc, job.cfg.strict)

    def execute(self, run_dir: Path, group: str | None = None) -> List[CircuitRecord]:
        """Find the masks and write every output into `run_dir`. Returns one record per lambda.

        With optimizer.lams, K masks are trained side by side on the same batches; each gets
        its own result directory `lam=<value>/` and the run directory gets a sweep summary.
        """
        job, cfg = self.job, self.job.cfg
        for warning in self.warnings:
            log.warning(warning)
        t_search = time.perf_counter()
        search = self.search_size() if cfg.optimizer.target_size is not None else None
        search_s = time.perf_counter() - t_search
        lams = [search.chosen] if search else lambdas(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        tracker = Tracker(run_dir, cfg.logger, config, name=run_name(cfg, run_dir), group=group)
        writer = RunWriter(run_dir, lams, bool(cfg.optimizer.lams), tracker, cfg.plots)
        step_log = StepLog(job, self.splits, writer, len(lams))
        failed = True
        try:
            t_train = time.perf_counter()
            mask, scores = self.find(writer, step_log, lams)
            train_s = time.perf_counter() - t_train
            results = results_of(job, self.splits, mask, scores, lams, step_log.histories)
            timing = {
                "train_s": round(train_s, 3),
                "total_s": round(time.perf_counter() - job.started, 3),
                "train_s_per_step": round(train_s / cfg.optimizer.steps, 5),
                "masks_trained_together": len(lams),
            } | ({"target_search_s": round(search_s, 3)} if search else {})
            if wants_evidence(cfg.evidence):
                evidence = gather_evidence(
                    job.engine, self.splits, self.objectives, mask[0], cfg.evidence, cfg.seed,
                    lambda seed: retrain(job.with_seed(seed), lams[0]),
                )  # fmt: skip
                writer.write_evidence(evidence, {d.name: d.title for d in job.desiderata})
            facts = RunFacts(
                self.baseline, baseline_intervals(self.splits), self.warnings, timing, self.checks,
                search.record() if search else {},
            )  # fmt: skip
            records = []
            for k, result in enumerate(results):
                record = make_record(job, result, facts)
                evaluation = self.evaluation(circuit_of(result, job.space)) | job.provenance()
                figures = attention_figure(job, record) | unit_figures(job, result, record.label)
                writer.write_result(k, result, record, job.space, figures, evaluation)
                records.append(record)
            if writer.batched:
                write_summary(Path(run_dir))
            failed = False
            return records
        finally:
            writer.close(failed=failed)

    def search_size(self) -> LambdaSearch:
        """The lambda whose circuit has optimizer.target_size units, by rounds of lambdas trained side by side."""
        job, o = self.job, self.job.cfg.optimizer

        def sizes_of(lams: Sequence[float]) -> List[int]:
            lam = torch.tensor(list(lams), dtype=torch.float32, device=job.device)
            desc = f"target size {o.target_size}: λ={','.join(f'{v:g}' for v in lams)}"
            mask = train_mask(job.engine, self.objectives, lam, o, progress=job.cfg.progress, desc=desc)
            return [int(n) for n in (mask < 0.5).flatten(1).sum(dim=1)]

        with out_of_memory_hint("while searching for the target size; lower optimizer.target_lams"):
            search = search_lambda(sizes_of, o.target_size, o.target_range, o.target_lams, o.target_rounds)
        (log.info if search.found is not None else log.warning)(search.summary())
        return search

    def find(self, writer: RunWriter, step_log: StepLog, lams: List[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks and their rankings, with what to keep when training stops early (NaN, Ctrl-C). (K, L, H+1)"""
        try:
            with out_of_memory_hint(
                "during mask training; set optimizer.batch_size smaller, train fewer lambdas at once, or use cache=cpu"
            ):
                return find_masks(self.job, self.objectives, lams, step_log)
        except NonFiniteLoss as e:
            writer.keep_last_good(e.last_good, self.job.space.names())
            raise
        except KeyboardInterrupt:
            if step_log.last_mask is not None:
                writer.keep_last_good(step_log.last_mask, self.job.space.names())
            kept = (
                f"; the last mask is in {writer.dirs[0] / 'mask_last_good.safetensors'}"
                if step_log.last_mask is not None
                else ""
            )
            raise Interrupted(f"interrupted at step {step_log.steps_done}{kept}") from None


def retrain(job: Job, lam: float) -> torch.Tensor:
    """DBM's continuous mask at `lam` on the job's data, without logging (stability across seeds). (L, n_cols)"""
    lams = torch.tensor([lam], device=job.device)
    desc = f"stability: seed {job.cfg.seed}"
    return train_mask(job.engine, job.objectives(), lams, job.cfg.optimizer, progress=job.cfg.progress, desc=desc)[0]


def run_name(cfg: DictConfig, run_dir: Path) -> str:
    """A tracking run's name that says what it is: when, which task, which method, which lambda(s) or size."""
    when = "_".join(Path(run_dir).resolve().parts[-2:]) if Path(run_dir).parent.name else Path(run_dir).name
    return f"{when} {cfg.task.name} {method_label(cfg)}"


def method_label(cfg: DictConfig) -> str:
    """`dbm λ=0.05`, `dbm λ=0.01,0.05`, or `single_patch k=5`."""
    if not method_named(cfg.method.name).learns_mask:
        return f"{cfg.method.name} k={cfg.method.k}"
    if cfg.optimizer.target_size is not None:
        return f"{cfg.method.name} size={cfg.optimizer.target_size}"
    return f"{cfg.method.name} λ={','.join(f'{lam:g}' for lam in lambdas(cfg))}"


def run_search(cfg: DictConfig, run_dir: Path, group: str | None = None) -> List[CircuitRecord]:
    """Build the job, then run the search into `run_dir` (Python callers; the train app checks the directory)."""
    return Run(Job(cfg)).execute(run_dir, group)
