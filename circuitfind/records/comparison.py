"""compare.json and its tables: finished runs of one task side by side (`circuitfind compare`).

Reading the runs (each a finished run directory, or a sweep of them; one task, one set of desiderata),
the faithfulness figures a run's eval.json already holds, and the tables printed and written as
compare.md. What is measured is evaluation/roles.py's; this module only reads and writes records.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from circuitfind.errors import CircuitfindError
from circuitfind.records.circuit import RECORD_FILE, CircuitRecord, read_record
from circuitfind.records.evaluation import read_evaluation
from circuitfind.records.files import write_json, write_text
from circuitfind.records.page import markdown_table
from circuitfind.records.rundir import finished_runs, job_overrides

COMPARE_FILE = "compare.json"
COMPARE_TABLES = "compare.md"
FAITHFULNESS = (  # (condition, figure) read from eval.json for each ablation and split
    ("necessity", "faithfulness"),
    ("necessity", "task_acc_drop"),
    ("sufficiency", "faithfulness"),
    ("sufficiency", "task_acc"),
)


@dataclass
class CompareRun:
    """One finished run to compare: where it is, its record, and the letter and model it is shown by."""

    path: Path
    record: CircuitRecord
    letter: str
    model: str

    @property
    def n_layers(self) -> int:
        return int(self.record.model["n_layers"])

    @property
    def label(self) -> str:
        return f"{self.letter}: {self.model}"

    def depth(self, layer: int) -> float:
        """A layer's relative depth, layer / n_layers: 0 is the first layer, whatever the model's depth."""
        return round(layer / self.n_layers, 3)


def model_name(run: Path, record: CircuitRecord) -> str:
    """The model as the command chose it (`model=smollm2_135m`), else its kind or checkpoint."""
    chosen = [o.split("=", 1)[1] for o in job_overrides(run) if o.lstrip("+").startswith("model=")]
    if chosen:
        return chosen[-1]
    path = record.model.get("name_or_path")
    return Path(path).name if path else str(record.model.get("kind"))


def trained_names(record: CircuitRecord) -> List[str]:
    return [t["name"] for t in record.desiderata.get("terms", []) if t.get("train", True)]


def read_runs(paths: Sequence[Path]) -> List[CompareRun]:
    """The finished runs at `paths` (a sweep gives each of its runs), checked to be comparable: one task,
    the same trained desiderata, each run once. Bad input is one line naming the fix."""
    found: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise CircuitfindError(
                f"{path} is not a directory; give finished run directories (each with {RECORD_FILE}, "
                "from circuitfind train)"
            )
        for run in finished_runs(path):
            if run.resolve() in {f.resolve() for f in found}:
                raise CircuitfindError(f"{run} is given twice; give each run once")
            found.append(run)
    if len(found) > len(string.ascii_uppercase):
        raise CircuitfindError(f"{len(found)} runs: compare at most {len(string.ascii_uppercase)} at once")
    runs = []
    for letter, run in zip(string.ascii_uppercase, found):
        record = read_record(run)
        if record.status != "complete":
            raise CircuitfindError(f"{run} is not a finished run (status {record.status!r}); finish it first")
        if "n_layers" not in record.model:
            raise CircuitfindError(f"{run}'s {RECORD_FILE} records no n_layers; re-run it with circuitfind train")
        runs.append(CompareRun(run, record, letter, model_name(run, record)))
    first = runs[0]
    for run in runs[1:]:
        task, other = first.record.data.get("task"), run.record.data.get("task")
        if task != other:
            raise CircuitfindError(
                f"{run.path} is a run of task {other!r} and {first.path} of task {task!r}; compare runs of one "
                f"task: train each model with the same task= (e.g. task={task} model=<name>)"
            )
        if trained_names(run.record) != trained_names(first.record):
            raise CircuitfindError(
                f"{run.path} was trained on desiderata {trained_names(run.record)} and {first.path} on "
                f"{trained_names(first.record)}; compare runs trained on the same desiderata (the same +desiderata=)"
            )
    return runs


def faithfulness_from_eval(run: Path, circuit: Sequence[str], kinds: Sequence[str]) -> Dict[str, Any]:
    """The faithfulness figures of `kinds` that the run's eval.json holds for its own circuit, per kind and
    split: {kind: {split: {"necessity/faithfulness": {"value", "ci"}, ...}}}. A kind it lacks is left out."""
    ev = read_evaluation(run)
    if ev is None or sorted(ev.get("circuit", [])) != sorted(circuit):
        return {}
    out: Dict[str, Any] = {}
    for kind in kinds:
        splits = ev.get("ablations", {}).get(kind, {}).get("splits")
        if splits:
            out[kind] = {split: faithfulness_figures(report) for split, report in splits.items()}
    return out


def faithfulness_figures(report: Dict[str, Any]) -> Dict[str, Any]:
    """The FAITHFULNESS figures of one split's report (evaluation/circuit_tests.split_report)."""
    return {
        f"{condition}/{figure}": report[condition][figure]
        for condition, figure in FAITHFULNESS
        if figure in report.get(condition, {})
    }


# -- tables ------------------------------------------------------------------------------------------


def figure(value: Dict[str, Any] | None, digits: int = 2) -> str:
    """`0.87 [0.83, 0.90]`."""
    if not value:
        return ""
    low, high = value["ci"]
    return f"{value['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def role_title(role: str, slots: Dict[str, List[str]]) -> str:
    """`mover (io)`, `inhibition (s, s2)`: a role and the slots it reads."""
    read = slots["distractor"] if role == "inhibition" else slots["moved"]
    return f"{role} ({', '.join(read)})"


def comparison_tables(result: Dict[str, Any]) -> str:
    """compare.json as the tables printed: the runs, each circuit's faithfulness, the roles side by side,
    then every unit by relative depth."""
    runs = result["runs"]
    split = result["split"]
    out = [
        f"{len(runs)} run(s) of task {result['task']} (trained desiderata: {', '.join(result['desiderata'])}); "
        "depth = layer / n_layers",
        markdown_table(
            ["run", "model", "layers x heads", "found by", "units", "directory"],
            [
                [r["letter"], r["model"], f"{r['n_layers']} x {r['n_heads']}", r["label"], len(r["circuit"]), r["run"]]
                for r in runs
            ],
        ),
        "",
        f"Faithfulness of each circuit on {split} (held-out pairs; 1 = the whole model's effect, 0 = none):",
        markdown_table(
            [
                "run",
                "ablation",
                "necessity: faithfulness",
                "sufficiency: faithfulness",
                "sufficiency: task acc",
                "from",
            ],
            [
                [
                    r["letter"],
                    kind,
                    figure(f.get(split, {}).get("necessity/faithfulness")),
                    figure(f.get(split, {}).get("sufficiency/faithfulness")),
                    figure(f.get(split, {}).get("sufficiency/task_acc")),
                    r["faithfulness_source"][kind],
                ]
                for r in runs
                for kind, f in r["faithfulness"].items()
            ],
        ),
    ]
    notes = [f"{r['letter']}: {note}" for r in runs for note in r["notes"]]
    if notes:
        out += ["", "Notes:", *notes]
    slots = result["slots"]
    if slots is not None:
        t = result["thresholds"]
        out += [
            "",
            f"Roles (attention >= {t['attention']:g}, share alone >= {t['share']:g}, inhibition >= "
            f"{t['inhibition']:g}; docs/ioi.md, 'Roles'); each unit with its depth, * in the circuit:",
            markdown_table(
                ["role", *(f"{r['letter']}: {r['model']}" for r in runs)],
                [
                    [role_title(role, slots) if role != "none" else "no role, in the circuit"]
                    + [
                        ", ".join(
                            f"{u['unit']}{'*' if u['in_circuit'] else ''} {u['depth']:.2f}"
                            for u in r["units"]
                            if (u["role"] or "none") == role and (role != "none" or u["in_circuit"])
                        )
                        or "-"
                        for r in runs
                    ]
                    for role in (*result["roles"], "none")
                    if role != "inhibition" or slots["distractor"]  # no distractor: nothing to inhibit
                ],
            ),
        ]
    labels = result["attention_labels"]
    moving = result["moving_desideratum"]
    out += [
        "",
        f"Units by relative depth: attention from the final token by slot; Δd, share and {moving} acc: patched alone "
        f"from the {moving} alternates ({split}, 95% interval); * in the circuit:",
        markdown_table(
            ["depth", "unit", *labels, "Δd alone", "share", f"{moving} acc", "role"],
            [
                [
                    f"{u['depth']:.2f}",
                    f"{letter} {u['unit']}{'*' if u['in_circuit'] else ''}",
                    *(f"{u['attention'].get(label, 0.0):.2f}" if u["attention"] else "" for label in labels),
                    figure(u["effect"]["splits"][split]["logit_diff"]),
                    f"{u['effect']['splits'][split]['share']:+.2f}",
                    f"{u['effect']['splits'][split]['acc']:.2f}",
                    u["role"] or "-",
                ]
                for _, letter, u in sorted(
                    ((u["depth"], r["letter"], u) for r in runs for u in r["units"]),
                    key=lambda x: (x[0], x[1], x[2]["unit"]),
                )
            ],
        ),
    ]
    return "\n".join(out) + "\n"


def write_comparison(out_dir: Path, result: Dict[str, Any]) -> tuple[Path, Path]:
    """compare.json and compare.md (the printed tables) in `out_dir`."""
    out_dir = Path(out_dir)
    write_json(out_dir / COMPARE_FILE, result)
    write_text(out_dir / COMPARE_TABLES, comparison_tables(result))
    return out_dir / COMPARE_FILE, out_dir / COMPARE_TABLES
