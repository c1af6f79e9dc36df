"""The circuit.json record: one result of a search, with one writer and one reader.

Every consumer (sweep summary, report, optimum, resuming a sweep, the organism's DBM check)
reads a finished run through `read_record`, and the names of its metrics through
`metric_key` and `headline_metrics`, so the schema lives here only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from circuitfind.errors import CircuitfindError
from circuitfind.model.space import ComponentSpace
from circuitfind.records.files import write_json

if TYPE_CHECKING:  # the record is read by light commands (report, resume) that need no torch
    import torch

RECORD_FILE = "circuit.json"
SPLIT_KINDS = ("test", "transfer")  # held-out pairs of the train operations; pairs of the transfer operations
CIRCUIT_COLUMNS = ("name", "kind", "layer", "head", "position", "neurons", "weight", "transformerlens")
EVAL_METRICS = ("acc", "acc_model", "logit_diff", "logit_diff_norm")  # per split, see evaluation/heldout.py


def metric_key(desideratum: str, split: str, metric: str) -> str:
    """The flat key of a held-out metric, e.g. `vd_test/acc`."""
    return f"{desideratum}_{split}/{metric}"


def headline_metrics(desiderata: Sequence[str], model_acc: bool = True) -> List[str]:
    """The metrics a summary shows: accuracy on each held-out and transfer split, agreement with
    the model's own answers, and the first desideratum's normalised logit difference."""
    keys = [metric_key(d, split, "acc") for split in SPLIT_KINDS for d in desiderata]
    if model_acc:
        keys += [metric_key(d, "test", "acc_model") for d in desiderata]
    if desiderata:
        keys.append(metric_key(desiderata[0], "test", "logit_diff_norm"))
    return keys


def circuit_table(mask: torch.Tensor, rounded: torch.Tensor, space: ComponentSpace) -> List[Dict[str, Any]]:
    """The patched units (rounded w = 0), weakest weight first. mask (L, n_cols)"""
    rows = [
        {
            "name": unit.name,
            "kind": unit.kind,
            "layer": unit.layer,
            "head": unit.head,
            "position": unit.position,
            "neurons": list(unit.neurons) if unit.neurons else None,
            "weight": round(float(mask[unit.layer, unit.col]), 6),
            "transformerlens": unit.transformerlens["hook"],
        }
        for unit in space.units()
        if rounded[unit.layer, unit.col] == 0
    ]
    return sorted(rows, key=lambda r: (r["weight"], r["layer"], r["name"]))


@dataclass
class CircuitRecord:
    """One lambda's (or one baseline's) circuit, its held-out metrics and how it was made."""

    circuit: List[Dict[str, Any]]  # CIRCUIT_COLUMNS per patched component, weakest weight first
    n_patched: int
    n_components: int
    fraction_patched: float
    lam: Optional[float]
    method: Dict[str, Any]
    metrics: Dict[str, float]  # metric_key(desideratum, split, metric) -> value, rounded mask
    baseline: Dict[str, float]  # the unpatched model on the same splits
    planted: Optional[Dict[str, Any]]  # precision/recall against a circuit planted in the model
    warnings: List[str]
    model: Dict[str, Any]
    data: Dict[str, Any]
    desiderata: Dict[str, Any]
    optimizer: Dict[str, Any]
    engine: Dict[str, Any]
    timing: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)  # the whole composed config, resolved
    attention: Dict[str, Dict[str, float]] = field(default_factory=dict)  # circuit head -> slot -> attention
    metrics_ci: Dict[str, List[float]] = field(default_factory=dict)  # metric key -> 95% bootstrap [low, high]
    baseline_ci: Dict[str, List[float]] = field(default_factory=dict)  # the same for `baseline`
    checks: Dict[str, Any] = field(default_factory=dict)  # the engine's self-checks (evaluation/selfcheck.py)
    lambda_search: Dict[str, Any] = field(default_factory=dict)  # optimizer.target_size (methods/target_size.py)
    headline_circuit: str = "rounded"  # which circuit `circuit` and `metrics` are: "pruned" or the "rounded" mask
    raw: Dict[str, Any] = field(default_factory=dict)  # when pruned: the rounded mask's circuit and figures
    pruning: Dict[str, Any] = field(default_factory=dict)  # what pruning did (methods/prune.py)
    status: str = "complete"

    @property
    def names(self) -> List[str]:
        """The circuit's component names."""
        return [row["name"] for row in self.circuit]

    @property
    def titles(self) -> Dict[str, str]:
        """The desiderata whose held-out metrics the record holds, name -> title: trained ones first."""
        terms = sorted(self.desiderata.get("terms", []), key=lambda t: not t.get("train", True))
        return {t["name"]: t.get("title") or t["name"] for t in terms}

    @property
    def evaluated(self) -> List[str]:
        """The names of those desiderata, in the same order."""
        return list(self.titles)

    @property
    def label(self) -> str:
        """How the circuit was chosen: `λ=0.05` (DBM) or `single_patch k=5` (a baseline)."""
        if self.lam is not None:
            return f"λ={self.lam:g}"
        return f"{self.method.get('name')} k={self.method.get('k')}"

    def headline(self) -> Dict[str, Any]:
        """lambda, size and the headline metrics, as summaries tabulate them."""
        return {"lam": self.lam, "n_patched": self.n_patched, **self.metrics}

    def to_json(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"status": data.pop("status"), **data}  # status first: it marks a finished run


def write_record(out_dir: Path, record: CircuitRecord) -> Path:
    """circuit.json, written atomically; it is written last, so its presence marks a finished result."""
    path = Path(out_dir) / RECORD_FILE
    write_json(path, record.to_json())
    return path


def read_record(run: Path) -> CircuitRecord:
    """The record of a finished run directory, or one line saying why there is none."""
    path = Path(run) / RECORD_FILE
    try:
        data = json.loads(path.read_text())
        return CircuitRecord(**data)
    except OSError:
        raise CircuitfindError(f"{run} has no readable {RECORD_FILE}; it is not a finished run") from None
    except (ValueError, TypeError) as e:
        raise CircuitfindError(f"{path} is not a circuitfind record ({e}); re-run the job") from None


def pruning_line(pruning: Dict[str, Any]) -> str:
    """What pruning did (methods/prune.py's record), in one sentence: the log line and the report's."""
    j = pruning["objective"]
    removed = ", ".join(pruning["removed"]) or "nothing"
    outside = set(pruning["put_in_from_outside"])
    put_in = [f"{u} (outside the rounded mask)" if u in outside else u for u in pruning["put_in"]]
    steps = pruning.get("by_position", [])  # older records: none, or each step's "positions"
    dropped = [", ".join(step.get("groups", step.get("positions", []))) for step in steps]
    changes = "".join(f"; first the units at {groups}, together" for groups in dropped)
    changes += f"; put in {', '.join(put_in)}" if put_in else ""
    replaced = pruning.get("smaller_search", {}).get("replaced")
    changes += f"; a smaller subset replaced {', '.join(replaced)}" if replaced else ""
    swapped = pruning.get("swapped") or {}
    if swapped.get("out"):
        changes += f"; swapped {', '.join(swapped['out'])} for {', '.join(swapped['in'])}"
    share = f", keeping {pruning['kept_share']:.0%} of its improvement" if pruning["kept_share"] is not None else ""
    bound = "bound" in j  # records from before prune.criterion have a bound too
    rule = f"bound {j['bound']:.4g}" if bound else f"price {j['price']:.4g} per unit"
    each = "" if bound else ", paid by each unit"
    on = f" on {j['pairs']} pairs" if j.get("pairs") else ""  # older records: on every pair
    return (
        f"pruning on the validation pairs removed {removed}{changes}: objective{on} {j['raw']:.4g} (rounded mask) -> "
        f"{j['pruned']:.4g} ({rule}; nothing patched: {j['nothing_patched']:.4g}{share}; "
        f"tolerance {pruning['tolerance']:g} of the circuit's improvement{each}){screening_words(pruning)}"
    )


def screening_words(pruning: Dict[str, Any]) -> str:
    """How far staged scoring took the circuits (methods/staged_scores.py), or nothing when it scored every pair."""
    s = pruning.get("screening")
    if not s:
        return ""
    return (
        f"; scored in stages of {s['screen_pairs']} pairs: {s['circuits_on_every_pair']} of "
        f"{pruning['circuits_scored']} circuits on every pair, {s['pairs_scored'] / s['pairs_without_screening']:.0%} "
        "of the work of scoring all on all"
    )


def planted_line(planted: Dict[str, Any]) -> str:
    """The found circuit against the ground truth, in one sentence (and why the truth is not unique, if so)."""
    if planted["planted"] is None:
        return f"no ground truth to score against: {planted['why']}"
    scores = f"precision {planted['precision']:.2f}, recall {planted['recall']:.2f}"
    if "circuits" not in planted:
        return f"against the circuit planted in the model {planted['planted']}: {scores}"
    if planted["unique"]:
        return f"against the ground truth read off the compiled graph {planted['planted']}: {scores}"
    return f"against the nearest of the ground truth's circuits, {planted['planted']}: {scores}; not unique: {planted['why']}"
