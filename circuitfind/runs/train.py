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

from circuitfind.config.schema import lambdas, wants_evidence
from circuitfind.errors import CircuitfindError, out_of_memory_hint
from circuitfind.evaluation.ablation import Ablation
from circuitfind.evaluation.bootstrap import as_pair
from circuitfind.evaluation.evidence import gather_evidence
from circuitfind.evaluation.heldout import (
    EvalSplit,
    baseline_intervals,
    baseline_of,
    circuit_warnings,
    evaluate_splits,
    low_baseline_warnings,
    prepare_split,
)
from circuitfind.evaluation.restoring import restoring_order
from circuitfind.methods.baselines import attribution_scores
from circuitfind.methods.dbm import NonFiniteLoss, OnStep, round_mask, train_mask
from circuitfind.methods.objective import Objective
from circuitfind.methods.prune import prune_circuits
from circuitfind.methods.ranking import path_head, path_scores
from circuitfind.methods.registry import Found, method_named
from circuitfind.methods.target_size import LambdaSearch, search_lambda
from circuitfind.records.circuit import CircuitRecord, pruning_line
from circuitfind.records.sweep import write_summary
from circuitfind.records.tracking import Tracker
from circuitfind.records.writer import RunWriter, SearchResult
from circuitfind.runs.job import Job
from circuitfind.runs.result import RunFacts, attention_figure, circuit_of, make_record, unit_figures

log = logging.getLogger(__name__)


class Interrupted(CircuitfindError):
    """Ctrl-C during training: the message says at which step, and where the last mask is."""

    exit_code = 130


def find_masks(job: Job, objectives: Sequence[Objective], lams: List[float], on_step: OnStep) -> Found:
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
    job: Job,
    splits,
    mask: torch.Tensor,
    circuits: torch.Tensor,
    scores: torch.Tensor,
    lams: List[float],
    histories,
    prunings: List[Dict | None],
) -> List[SearchResult]:
    """Each result's held-out metrics with their 95% intervals: of its circuit (the headline), of the
    raw rounded mask when pruning changed it, and of the continuous weights (accuracy).
    mask, circuits, scores (K, L, n_cols)"""
    rounded = round_mask(mask)
    k = mask.shape[0]
    both = torch.cat([circuits, rounded]) if any(prunings) else circuits  # headline, then raw
    intervals: Dict[str, torch.Tensor] = {}
    continuous_intervals: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        final = evaluate_splits(splits, job.engine, both, intervals=intervals)
        continuous = held_out_accuracy(job, splits, mask, continuous_intervals)
    names = job.space.names()
    learns_mask = method_named(job.cfg.method.name).learns_mask
    results = []
    for i, lam in enumerate(lams):
        raw = None
        if prunings[i] is not None:
            raw = {
                "circuit": [n for n, w in zip(names, rounded[i].flatten().tolist()) if w == 0],
                "metrics": {key: float(v[k + i]) for key, v in final.items()},
                "metrics_ci": {key: as_pair(v[k + i]) for key, v in intervals.items()},
            }
        results.append(
            SearchResult(
                lam=lam if learns_mask else None,  # a ranking has no sparsity weight
                mask=mask[i],
                rounded=rounded[i],
                circuit=circuits[i],
                scores=scores[i],
                metrics={key: float(v[i]) for key, v in final.items()}
                | {f"continuous/{key}": float(v[i]) for key, v in continuous.items()},
                metrics_ci={key: as_pair(v[i]) for key, v in intervals.items()}
                | {f"continuous/{key}": as_pair(v[i]) for key, v in continuous_intervals.items()},
                history=histories[i],
                raw=raw,
                pruning=prunings[i],
            )
        )
    return results


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
        # too few prompts for a mean ablation (the evaluation's, or the path ranking's) stops the run here
        self.evaluation.check_reference(needed=bool(job.cfg.optimizer.path_lams))
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
            found = self.find(writer, step_log, lams)
            mask = found.masks
            train_s = time.perf_counter() - t_train
            t_prune = time.perf_counter()
            circuits, prunings = self.prune(mask)
            prune_s = time.perf_counter() - t_prune
            t_ranking = time.perf_counter()
            scores = self.ranking(found, lams, circuits)
            ranking_s = time.perf_counter() - t_ranking
            results = results_of(job, self.splits, mask, circuits, scores, lams, step_log.histories, prunings)
            timing = {
                "train_s": round(train_s, 3),
                "prune_s": round(prune_s, 3),
                "ranking_s": round(ranking_s, 3),
                "total_s": round(time.perf_counter() - job.started, 3),
                "train_s_per_step": round(train_s / cfg.optimizer.steps, 5),
                "masks_trained_together": len(lams),
            } | ({"target_search_s": round(search_s, 3)} if search else {})
            if wants_evidence(cfg.evidence):
                evidence = gather_evidence(
                    job.engine, self.splits, self.objectives, results[0].scores, results[0].circuit, cfg.evidence,
                    cfg.seed, lambda seed: refind(job.with_seed(seed), lams[0]),
                )  # fmt: skip
                writer.write_evidence(evidence, {d.name: d.title for d in job.desiderata})
            facts = RunFacts(
                self.baseline, baseline_intervals(self.splits), self.warnings, timing, self.checks,
                search.record() if search else {},
            )  # fmt: skip
            records = []
            for k, result in enumerate(results):
                record = make_record(job, result, facts)
                own = circuit_warnings(self.splits, result.metrics, self.baseline, larger_circuit(cfg))
                record.warnings = [*facts.warnings, *own]
                evaluation = self.evaluation(circuit_of(result, job.space)) | job.provenance()
                figures = attention_figure(job, record) | unit_figures(job, result, record.label)
                writer.write_result(k, result, record, job.space, figures, evaluation)
                for warning in own:
                    log.warning(f"{record.label}: {warning}")
                records.append(record)
            if writer.batched:
                write_summary(Path(run_dir))
            failed = False
            return records
        finally:
            writer.close(failed=failed)

    def prune(self, mask: torch.Tensor) -> tuple[torch.Tensor, List[Dict | None]]:
        """Each mask's circuit: its rounding, pruned on the validation split when the run prunes
        (methods/prune.py), with what pruning did. (K, L, n_cols)"""
        rounded = round_mask(mask)
        if not self.job.prunes:
            return rounded, [None] * mask.shape[0]
        # the validation pairs are prepared as pruning first scores them (after the search, whose memory they need
        # not share): their alternates' runs and clean runs are part of what pruning costs, and of prune_s
        validation = self.job.objectives("validation")
        with out_of_memory_hint("while pruning on the validation pairs; set optimizer.batch_size smaller or cache=cpu"):
            pruned = prune_circuits(self.job.engine, validation, rounded, mask, self.job.cfg.prune)
        for record in (record for _, record in pruned):
            log.info(pruning_line(record))
        return torch.stack([circuit for circuit, _ in pruned]), [record for _, record in pruned]

    def ranking(self, found: Found, lams: List[float], circuits: torch.Tensor) -> torch.Tensor:
        """Each result's ranking of every unit: the method's own, or with optimizer.path_lams the
        regularisation path with the result's circuit first, and the units no lambda patches ordered by what
        each restores under mean ablation on the training pairs (evaluation/restoring.py), equal gains by
        attribution (methods/ranking.py). (K, L, n_cols)"""
        if found.ladder is None:
            return found.scores
        path, engine, seed = [float(v) for v in self.job.cfg.optimizer.path_lams], self.job.engine, self.job.cfg.seed
        ties = attribution_scores(engine, self.objectives, engine.device).cpu()  # the same for every result
        train = [prepare_split(o.desideratum, "train", o.batches, engine) for o in self.objectives]
        mean = Ablation("mean", self.evaluation.reference(), seed)
        scores = []
        for mask, lam, circuit in zip(found.masks, lams, circuits):
            weights = torch.cat([found.ladder, mask[None]])
            head = path_head(weights, circuit)
            tail = restoring_order(engine, train, head, ties, mean, seed)
            scores.append(path_scores(weights, [*path, lam], circuit, tail).to(mask.device))
            log.info(
                f"λ={lam:g}: ranking: the {int((~head).sum())} units no lambda patches, by what each restores under "
                "mean ablation"
            )
        return torch.stack(scores)

    def search_size(self) -> LambdaSearch:
        """The lambda whose circuit has optimizer.target_size units, by rounds of lambdas trained side by side."""
        job, o = self.job, self.job.cfg.optimizer

        def sizes_of(lams: Sequence[float]) -> List[int]:
            lam = torch.tensor(list(lams), dtype=torch.float32, device=job.device)
            desc = f"target size {o.target_size}: λ={','.join(f'{v:g}' for v in lams)}"
            mask = train_mask(
                job.engine, self.objectives, lam, o, progress=job.cfg.progress, desc=desc, seed=job.cfg.seed
            )
            return [int(n) for n in (mask < 0.5).flatten(1).sum(dim=1)]

        with out_of_memory_hint("while searching for the target size; lower optimizer.target_lams"):
            search = search_lambda(sizes_of, o.target_size, o.target_range, o.target_lams, o.target_rounds)
        (log.info if search.found is not None else log.warning)(search.summary())
        return search

    def find(self, writer: RunWriter, step_log: StepLog, lams: List[float]) -> Found:
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


def refind(job: Job, lam: float) -> List[str]:
    """The circuit the run's search finds at `lam` on the job's data, pruned when the run prunes, without
    logging or outputs (stability across seeds): its unit names."""
    lams = torch.tensor([lam], device=job.device)
    desc = f"stability: seed {job.cfg.seed}"
    cfg = job.cfg
    mask = train_mask(
        job.engine, job.objectives(), lams, cfg.optimizer, progress=cfg.progress, desc=desc, seed=cfg.seed
    )
    circuit = round_mask(mask)[0]
    if job.prunes:
        ((circuit, _),) = prune_circuits(job.engine, job.objectives("validation"), circuit[None], mask[:1], cfg.prune)
    return [n for n, w in zip(job.space.names(), circuit.flatten().tolist()) if w == 0]


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


def larger_circuit(cfg: DictConfig) -> str:
    """The setting that gives a larger circuit: a lower sparsity weight for a mask search, a larger k
    for a ranking."""
    return "lower optimizer.lam" if method_named(cfg.method.name).learns_mask else "raise method.k"


def run_search(cfg: DictConfig, run_dir: Path, group: str | None = None) -> List[CircuitRecord]:
    """Build the job, then run the search into `run_dir` (Python callers; the train app checks the directory)."""
    return Run(Job(cfg)).execute(run_dir, group)
