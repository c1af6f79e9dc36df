"""The report of a run or sweep: one self-contained HTML page and a Markdown summary.

Every figure is embedded (base64 PNG), so the page can be mailed or attached as it is.
Sections, per setup (runs that share model, desiderata, task and method): summary, the paper's
figure (accuracy against components patched, when there are several runs), then per run the
command, seed, steps, composed config, mask heatmap, circuit table, attention of circuit heads,
training curves and transfer results; then baselines, faithfulness curves, stability and
optimality where computed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import yaml

from circuitfind.records import plots
from circuitfind.records.circuit import (
    CIRCUIT_COLUMNS,
    EVAL_METRICS,
    RECORD_FILE,
    CircuitRecord,
    headline_metrics,
    metric_key,
    planted_line,
    pruning_line,
    read_record,
)
from circuitfind.records.evaluation import (
    EVAL_FILE,
    add_checks,
    add_evaluation,
    add_metrics_with_intervals,
    evaluation_only_report,
    read_evaluation,
)
from circuitfind.records.files import write_text
from circuitfind.records.page import Page
from circuitfind.records.rundir import finished_runs, invocation_file, job_overrides
from circuitfind.records.sweep import format_value as fmt
from circuitfind.records.sweep import summary_columns


def summary_rows(results: Dict[Path, CircuitRecord], columns: Sequence[str]) -> List[List[Any]]:
    return [[r.headline().get(c) for c in columns] + [run.name] for run, r in results.items()]


def command_of(run: Path) -> str | None:
    """The command line a run was made with, from the overrides recorded in its .hydra/."""
    return " ".join(["circuitfind train", *job_overrides(run)]) if invocation_file(run, "overrides.yaml") else None


def add_run(page: Page, run: Path, result: CircuitRecord) -> None:
    page.html.append(
        f"<h3>{html.escape(run.name)} ({html.escape(result.label)}, method {result.method.get('name')})</h3>"
    )
    page.md += [f"### {run.name} ({result.label})", ""]
    seed, steps = result.data.get("seed"), result.optimizer.get("steps")
    trained = f"{steps} steps" if result.lam is not None else "no training steps (a ranking)"
    page.text(f"Command: {command_of(run) or 'not recorded'}; seed {seed}; {trained}.")
    if result.config:
        page.details("composed config", yaml.safe_dump(result.config, sort_keys=False))
    if (run / "mask_heatmap.png").is_file():
        page.image(run / "mask_heatmap.png", f"mask heatmap, {run.name}")
    for warning in result.warnings:
        page.text(f"Warning: {warning}")
    if result.headline_circuit == "pruned":
        did = pruning_line(result.pruning)
        page.text(
            f"The circuit below is the pruned one (the headline): {result.n_patched} units. {did[0].upper()}{did[1:]}."
        )
    page.table(CIRCUIT_COLUMNS, [[row.get(c) for c in CIRCUIT_COLUMNS] for row in result.circuit])
    if result.raw:
        page.text(
            f"Before pruning, the rounded mask patched {result.raw['n_patched']}: {', '.join(result.raw['circuit'])}."
        )
        keys = [k for k in result.metrics if k in result.raw["metrics"]]
        page.table(
            ["metric", "pruned circuit (headline)", "rounded mask"],
            [[k, result.metrics[k], result.raw["metrics"][k]] for k in keys],
        )
    if result.lambda_search:
        s = result.lambda_search
        tried = ", ".join(f"λ={lam:g}: {size}" for lam, size in s["tried"])
        page.text(
            f"Target size {s['target_size']}: {'reached' if s['reached'] else 'not reached; the nearest is shown'} "
            f"at λ={s['lam']:g}. Lambdas tried (units): {tried}."
        )
    if result.planted:
        line = planted_line(result.planted)
        page.text(line[0].upper() + line[1:] + ".")
    if (run / "attention.png").is_file():
        page.image(run / "attention.png", f"attention of the circuit heads, {run.name}")
    if result.attention:
        labels = list(dict.fromkeys(label for masses in result.attention.values() for label in masses))
        page.text("Where each circuit head looks from the final position (mean attention to each slot's tokens):")
        page.table(["head", *labels], [[head, *(m.get(x) for x in labels)] for head, m in result.attention.items()])
    if (run / "curves.png").is_file():
        page.image(run / "curves.png", f"training curves (losses, sparsity, size, held-out accuracy), {run.name}")
    transfer = [
        [f"{d}_transfer", metric, result.metrics[metric_key(d, "transfer", metric)]]
        for d in result.evaluated
        for metric in EVAL_METRICS
        if metric_key(d, "transfer", metric) in result.metrics
    ]
    if transfer:
        page.text("Transfer split (slot values never used in training; rounded mask):")
        page.table(["split", "metric", "value"], transfer)
    add_metrics_with_intervals(page, result.metrics, result.metrics_ci)
    add_checks(page, result.checks)
    evaluation = read_evaluation(run)
    if evaluation is not None:
        add_evaluation(page, evaluation)
    page.text(
        "Unpatched model on the same splits (task_acc: its first token is the answer's on the split's base "
        "prompts; acc_unpatched: the desideratum's accuracy when nothing is patched):"
    )
    page.table(["metric", "value"], [[k, v] for k, v in result.baseline.items()])


def with_ci(row: Mapping[str, Any], key: str) -> Any:
    """A table cell: the value, with its 95% interval when the row has one (`<key>_ci`)."""
    if f"{key}_ci" not in row:
        return row.get(key)
    low, high = row[f"{key}_ci"]
    return f"{fmt(row[key])} [{fmt(low)}, {fmt(high)}]"


def add_evidence(page: Page, evidence: Dict[Path, Dict[str, Any]], desiderata: Mapping[str, str]) -> None:
    page.section("baselines", "Baselines at equal circuit size")
    if not evidence:
        page.text(
            "Not computed: run with evidence=full to compare DBM with single-component patching, "
            "attribution and random circuits."
        )
    for run, ev in evidence.items():
        keys = ["method", "k", *headline_metrics(list(desiderata), model_acc=False)]
        page.text(
            f"{run.name}: DBM circuit size {ev['dbm_size']}; components ranked by {ev['ranked_by']}; "
            "random rows are means over draws (std in evidence.json)."
        )
        page.table(keys, [[with_ci(row, k) for k in keys] for row in ev["comparison"]])
    page.section("curves", "Faithfulness curves")
    for run, ev in evidence.items():
        if (run / "faithfulness.png").is_file():
            page.image(run / "faithfulness.png", f"held-out metrics against components patched, {run.name}")
        if "curves" in ev:
            rows = [[m, k, v] for m, c in ev["curves"].items() for k, v in c["auc"].items()]
            page.table(["method", "curve", "area (x = fraction patched)"], rows)
    if not any("curves" in ev for ev in evidence.values()):
        page.text("Not computed: run with evidence=full (or evidence.curves=true).")
    page.section("stability", "Stability across seeds and data resamples")
    stable = {run: ev["stability"] for run, ev in evidence.items() if "stability" in ev}
    for run, st in stable.items():
        page.text(
            f"{run.name}: seeds {st['seeds']}, mean pairwise Jaccard similarity "
            f"{st['mean_pairwise_jaccard']:.3f}, circuit sizes {st['sizes']}."
        )
        page.table(["component", "chosen in share of seeds"], list(st["frequency"].items()))
    if not stable:
        page.text("Not computed: run with evidence=full (or evidence.stability_seeds=5).")


def add_optimality(page: Page, runs: List[Path]) -> None:
    page.section("optimality", "Optimality (exhaustive search)")
    found = False
    for run in runs:
        path = run / "optimum.json"
        if path.is_file():
            found = True
            o = json.loads(path.read_text())
            found_text = (
                f"{run.name}: found circuit of {o['found']['size']} components, held-out objective "
                f"{o['found']['objective']:.4f}"
            )
            if o["gap"] is None:
                page.text(
                    f"{found_text}; the search stopped at k={o['k']}, below the circuit's size, so there is no "
                    f"best subset of that size to compare with (rerun `circuitfind optimum --k {o['found']['size']}` "
                    "if it is feasible)."
                )
            else:
                page.text(f"{found_text}; gap to the best subset of that size: {fmt(o['gap'])}.")
            page.table(
                ["size", "best components", "objective", "subsets tried"],
                [[s, ", ".join(b["components"]), b["objective"], b["subsets"]] for s, b in o["best_by_size"].items()],
            )
    if not found:
        page.text("Not computed: run `circuitfind optimum <run>` on a model with at most 40 components.")


def setup_of(record: CircuitRecord) -> Dict[str, Any]:
    """What runs must share to be summarised together: model, components, desiderata, task and method."""
    return {
        "model": record.model.get("name_or_path") or record.model.get("kind"),
        "model_type": record.model.get("model_type"),
        "components": record.n_components,
        "desiderata": record.desiderata.get("name"),
        "task": [record.data.get("task"), record.data.get("template")],
        "method": record.method.get("name"),
    }


def group_by_setup(results: Dict[Path, CircuitRecord]) -> List[Dict[Path, CircuitRecord]]:
    """The runs in groups that share one setup, in the order they are first met."""
    groups: Dict[str, Dict[Path, CircuitRecord]] = {}
    for run, record in results.items():
        groups.setdefault(json.dumps(setup_of(record), sort_keys=True), {})[run] = record
    return list(groups.values())


def add_group(page: Page, root: Path, suffix: str, results: Dict[Path, CircuitRecord]) -> None:
    """One setup's summary, its accuracy-over-lambda figure (for several runs) and its circuits."""
    first = next(iter(results.values()))
    page.text(
        f"Model {first.model['model_type']} ({first.model.get('name_or_path') or first.model['kind']}), "
        f"{first.n_components} components; task {first.data.get('task')}; desiderata {first.desiderata['name']}; "
        f"method {first.method.get('name')}; "
        f"{len(results)} finished run(s). Accuracies are on held-out pairs with the rounded mask."
    )
    columns = summary_columns(first)
    page.table([*columns, "run"], summary_rows(results, columns))
    for warning in first.warnings:
        page.text(f"Warning: {warning}")
    if len(results) > 1:  # one run is one point: no figure over lambda
        page.section(f"sweep{suffix}", "Accuracy against components patched (over lambda)")
        figure = root / f"report_accuracy_vs_size{suffix}.png"
        plots.sweep_figure([r.headline() for r in results.values()], first.titles, figure)
        page.image(figure, "held-out accuracy against the number of components patched, one point per run")
    page.section(f"runs{suffix}", "Circuits")
    for run, result in results.items():
        add_run(page, run, result)


def build_report(path: Path) -> tuple[Path, Path]:
    """Write report.html and report.md into `path`; returns their paths.

    Runs of different setups (model, desiderata, task, method) are never summarised under one
    header: each setup gets its own section.
    """
    path = Path(path)
    if (path / EVAL_FILE).is_file() and not (path / RECORD_FILE).is_file():
        return write_page(path, evaluation_only_report(path, read_evaluation(path)))
    runs = finished_runs(path)
    results = {run: read_record(run) for run in runs}
    groups = group_by_setup(results)
    page = Page(f"circuitfind report: {path.name}", path)
    if len(groups) > 1:
        page.text(f"{len(runs)} finished runs of {len(groups)} different setups, each summarised on its own below.")
    for number, group in enumerate(groups, start=1):
        first = next(iter(group.values()))
        suffix = "" if len(groups) == 1 else f"-{number}"  # anchors stay unique
        title = (
            "Summary" if len(groups) == 1 else f"Setup {number}: {first.desiderata['name']}, {first.method.get('name')}"
        )
        page.section(f"summary{suffix}", title)
        add_group(page, path, suffix, group)
    evidence = {
        run: json.loads((run / "evidence.json").read_text()) for run in runs if (run / "evidence.json").is_file()
    }
    add_evidence(page, evidence, next(iter(results.values())).titles)
    add_optimality(page, runs)
    return write_page(path, page)


def write_page(path: Path, page: Page) -> tuple[Path, Path]:
    html_path, md_path = path / "report.html", path / "report.md"
    write_text(html_path, page.render())
    write_text(md_path, "\n".join(page.md) + "\n")
    return html_path, md_path
