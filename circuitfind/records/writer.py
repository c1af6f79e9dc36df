"""Where one run's results go: its directory (one result directory per lambda), the tracker, the figures.

A run trains K masks at once with `optimizer.lams` (each result in `lam=<value>/`, W&B keys
prefixed `lam=<value>/`) or one mask (the run directory itself). Each result is written as
mask.safetensors, exports and figures first, then circuit.json last: its presence marks a
finished result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch

from circuitfind.model.space import ComponentSpace
from circuitfind.records import plots
from circuitfind.records.circuit import CIRCUIT_COLUMNS, CircuitRecord, metric_key, planted_line, write_record
from circuitfind.records.evaluation import EVAL_FILE, evaluation_lines
from circuitfind.records.export import export_circuit
from circuitfind.records.files import write_json, write_tensors, write_text
from circuitfind.records.tracking import Tracker

log = logging.getLogger(__name__)
Figure = Callable[[Path], None]  # draws one figure into the path it is given


@dataclass
class SearchResult:
    """One lambda's (or one baseline's) outcome in memory: masks, held-out metrics, training history."""

    lam: float | None  # None for a baseline method
    mask: torch.Tensor  # (L, H+1) continuous weights, 1 = keep
    rounded: torch.Tensor  # (L, H+1) 0 = patched: the weights rounded at 0.5
    circuit: torch.Tensor  # (L, H+1) 0 = patched: the circuit reported (pruned, or the rounded mask)
    scores: torch.Tensor  # (L, H+1) the ranking the mask comes from, higher = more important
    metrics: Dict[str, float]  # metric_key(...) -> value, of the circuit; continuous/... for the weights
    metrics_ci: Dict[str, List[float]]  # metric_key(...) -> 95% bootstrap interval, of the circuit
    history: List[Dict[str, float]]  # one row per training step
    raw: Dict[str, Any] | None = None  # when pruned: the rounded mask's circuit, metrics and intervals
    pruning: Dict[str, Any] | None = None  # what pruning did (methods/prune.py)


class RunWriter:
    """The outputs of one run: result directories, tracking, figures."""

    def __init__(self, run_dir: Path, lams: Sequence[float], batched: bool, tracker: Tracker, plots: bool):
        self.run_dir = Path(run_dir)
        self.batched = batched
        self.dirs = [self.run_dir / f"lam={lam:g}" for lam in lams] if batched else [self.run_dir]
        self.prefixes = [f"lam={lam:g}/" for lam in lams] if batched else [""]
        self.tracker = tracker
        self.plots = plots

    def log_step(self, step: int, rows: Sequence[Dict[str, float]]) -> None:
        """One training step's metrics of every mask (metrics.jsonl and the tracker)."""
        self.tracker.log({p + key: v for p, row in zip(self.prefixes, rows) for key, v in row.items()}, step)

    def keep_last_good(self, masks: torch.Tensor, names: List[str]) -> None:
        """Each mask as it was before training failed. masks (K, L, H+1)"""
        for mask, out_dir in zip(masks, self.dirs):
            write_tensors(out_dir / "mask_last_good.safetensors", {"continuous": mask}, {"names": json.dumps(names)})

    def write_evidence(self, evidence: Dict[str, Any], desiderata: Mapping[str, str]) -> None:
        write_json(self.run_dir / "evidence.json", evidence)
        if not self.plots:
            return
        if "curves" in evidence:
            plots.faithfulness_figure(evidence["curves"], desiderata, self.run_dir / "faithfulness.png")
            self.tracker.image("faithfulness", self.run_dir / "faithfulness.png")
        rows = evidence["comparison"]
        keys = sorted({k for r in rows for k in r})
        self.tracker.table("baselines", keys, [[r.get(k) for k in keys] for r in rows])

    def write_result(
        self,
        k: int,
        result: SearchResult,
        record: CircuitRecord,
        space: ComponentSpace,
        figures: Dict[str, Figure],
        evaluation: Dict[str, Any],
    ) -> Path:
        """The k-th result's files, circuit.json last; `figures` are drawn besides the standard ones,
        `evaluation` (evaluation/circuit_tests.py) is eval.json."""
        out_dir, prefix = self.dirs[k], self.prefixes[k]
        names = space.names()
        write_evaluation(out_dir, evaluation)
        tensors = {
            "continuous": result.mask,
            "rounded": result.rounded,
            "circuit": result.circuit,
            "scores": result.scores,
        }
        write_tensors(out_dir / "mask.safetensors", tensors, {"names": json.dumps(names)})
        if self.batched:  # the run directory's metrics.jsonl holds every lambda; each result gets its own
            write_text(out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in result.history))
        export_circuit(out_dir, result.scores, result.circuit, space, record.model["hidden_size"])
        summary = {"n_patched": record.n_patched, "fraction_patched": record.fraction_patched, **record.metrics}
        if record.planted and record.planted["planted"] is not None:
            summary |= {f"planted/{k}": record.planted[k] for k in ("precision", "recall")}
        if record.raw:
            summary |= {"rounded/n_patched": record.raw["n_patched"]}
            summary |= {f"rounded/{k}": v for k, v in record.raw["metrics"].items()}
        self.tracker.summary(
            {prefix + k: v for k, v in summary.items()} | {f"baseline/{k}": v for k, v in record.baseline.items()}
        )
        self.tracker.table(
            prefix + "circuit", list(CIRCUIT_COLUMNS), [[r[c] for c in CIRCUIT_COLUMNS] for r in record.circuit]
        )
        if self.plots:
            title = f"{record.n_patched} of {record.n_components} components patched ({record.label})"
            standard: Dict[str, Figure] = {
                "mask_heatmap": lambda path: plots.mask_heatmap(result.mask.cpu().numpy(), path, title),
                "curves": lambda path: plots.training_curves(result.history, record.titles, path),
            }
            for name, draw in (standard | figures).items():
                draw(out_dir / f"{name}.png")
                self.tracker.image(prefix + name, out_dir / f"{name}.png")
        path = write_record(out_dir, record)
        log_result(record, out_dir)
        return path

    def close(self, failed: bool) -> None:
        self.tracker.close(failed=failed)


def held_out_summary(record_metrics: Dict[str, float], names: Sequence[str]) -> str:
    """`VD acc 1.00, OI acc 1.00, VD transfer 1.00`: each desideratum's held-out accuracy, the first's transfer."""
    m = record_metrics
    accs = [f"{d.upper()} acc {m.get(metric_key(d, 'test', 'acc'), float('nan')):.2f}" for d in names]
    if names and metric_key(names[0], "transfer", "acc") in m:  # a task may have no transfer split
        accs.append(f"{names[0].upper()} transfer {m[metric_key(names[0], 'transfer', 'acc')]:.2f}")
    return ", ".join(accs)


def log_result(record: CircuitRecord, out_dir: Path) -> None:
    """The run's log lines: the circuit (pruned when the run prunes, and then the rounded mask it came
    from), each desideratum's held-out accuracy, and planted scores."""
    names = record.evaluated
    what = "pruned circuit" if record.headline_circuit == "pruned" else "circuit"
    head = f"{record.label}: {what} of {record.n_patched} of {record.n_components} units {record.names[:12]}"
    log.info(f"{head}; held-out {held_out_summary(record.metrics, names)}; written to {out_dir}")
    if record.raw:
        raw = record.raw
        log.info(
            f"{record.label}: before pruning, the rounded mask patched {raw['n_patched']} {raw['circuit'][:12]}; "
            f"held-out {held_out_summary(raw['metrics'], names)}"
        )
    if record.planted:
        log.info(f"{record.label}: {planted_line(record.planted)}")


def write_evaluation(out_dir: Path, evaluation: Dict[str, Any]) -> Path:
    """eval.json, and its summary in the log."""
    path = Path(out_dir) / EVAL_FILE
    write_json(path, evaluation)
    for line in evaluation_lines(evaluation):
        log.info(line)
    return path
