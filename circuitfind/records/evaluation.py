"""eval.json: the tests of one circuit (evaluation/circuit_tests.py), as log lines and report sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from circuitfind.errors import CircuitfindError
from circuitfind.records.page import Page
from circuitfind.records.sweep import format_value as fmt

EVAL_FILE = "eval.json"
COLUMNS = ("task_acc", "acc", "logit_diff", "faithfulness")
Table = Tuple[str, List[str], List[List[Any]]]  # caption, columns, rows


def read_evaluation(folder: Path) -> Dict[str, Any] | None:
    """A folder's eval.json, or None when it has none."""
    path = Path(folder) / EVAL_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CircuitfindError(f"{path} is not readable JSON ({e}); re-run `circuitfind eval`") from None


def with_interval(figure: Dict[str, Any] | None) -> str:
    """`0.98 [0.94, 1.00]`: a value and its 95% interval."""
    if not figure:
        return ""
    low, high = figure["ci"]
    return f"{figure['value']:.3g} [{low:.3g}, {high:.3g}]"


def areas_text(r: Dict[str, Any]) -> str:
    """A split's MIB areas for the log line, or why it has none."""
    if r.get("areas_undefined"):
        return f"; CPR and CMD undefined: {r['areas_undefined']}"
    return f"; CPR {with_interval(r['cpr'])}, CMD {with_interval(r['cmd'])}" if "cpr" in r else ""


def evaluation_lines(ev: Dict[str, Any]) -> List[str]:
    """The log's summary: necessity and sufficiency on each held-out and transfer split, then minimality."""
    lines = []
    for kind, ablation in ev["ablations"].items():
        for split, r in ablation["splits"].items():
            lines.append(
                f"{kind} ablation, {split}: necessity (circuit ablated) task acc drop "
                f"{with_interval(r['necessity']['task_acc_drop'])}, faithfulness {with_interval(r['necessity']['faithfulness'])}; "
                f"sufficiency (only the circuit kept) task acc {with_interval(r['sufficiency']['task_acc'])}, "
                f"faithfulness {with_interval(r['sufficiency']['faithfulness'])}" + areas_text(r)
            )
    m = ev["minimality"]
    flagged = m["not_needed"]
    lines.append(
        f"minimality: {', '.join(flagged)} not needed on held-out pairs (leaving it out does not raise the objective "
        f"by a clear {m['min_share']:.0%} of the circuit's effect)"
        if flagged
        else f"minimality: each of the {ev['n_units']} units is needed on held-out pairs"
    )
    for group in m.get("redundant_groups", []):
        lines.append(
            f"minimality: {', '.join(group['units'])} back each other up: each is unneeded alone, but leaving them "
            f"out together raises the objective by {with_interval(group['objective_change'])}"
        )
    return lines


def evaluation_tables(ev: Dict[str, Any]) -> List[Table]:
    """The report's tables: one per ablation kind (conditions by split), the areas, and minimality."""
    tables: List[Table] = []
    for kind, ablation in ev["ablations"].items():
        rows = []
        for split, r in ablation["splits"].items():
            for condition in ("full", "empty", "necessity", "sufficiency"):
                rows.append([split, condition, *(with_interval(r[condition].get(c)) for c in COLUMNS)])
        tables.append((f"{kind} ablation: {ablation['description']}", ["split", "condition", *COLUMNS], rows))
        areas = [
            [split, with_interval(r["cpr"]) or "undefined", with_interval(r["cmd"]) or "undefined"]
            for split, r in ablation["splits"].items()
            if "cpr" in r
        ]
        if areas:
            tables.append(
                (
                    f"{kind} ablation: MIB's areas over the units kept, ranked by {ev['ranked_by']}",
                    ["split", "CPR", "CMD"],
                    areas,
                )
            )
    m = ev["minimality"]
    rows = [
        [u["unit"], with_interval(u["objective_change"]), u["share"], "yes" if u["needed"] else "NO"]
        for u in m["units"]
    ]
    tables.append(
        (
            f"minimality: the held-out objective's change when the unit alone is left out ({m['objective']}; "
            f"circuit {m['circuit_objective']:.4g}, nothing patched {m['nothing_patched_objective']:.4g})",
            ["unit", "objective change", "share of the circuit's effect", "needed"],
            rows,
        )
    )
    groups = m.get("redundant_groups", [])
    if groups:
        tables.append(
            (
                "redundant groups: units each unneeded alone but needed together (the pair that raises the "
                "objective most when left out)",
                ["units", "objective change", "share of the circuit's effect"],
                [[", ".join(g["units"]), with_interval(g["objective_change"]), g["share"]] for g in groups],
            )
        )
    return tables


def add_metrics_with_intervals(
    page: Page, metrics: Mapping[str, float], intervals: Mapping[str, Sequence[float]]
) -> None:
    """Every held-out figure with its 95% bootstrap interval over the split's pairs."""
    if not intervals:
        return
    page.text("Held-out figures of the circuit patched from the alternates, with 95% bootstrap intervals over pairs:")
    page.table(
        ["metric", "value", "95% interval"],
        [[key, metrics[key], f"[{fmt(low)}, {fmt(high)}]"] for key, (low, high) in intervals.items() if key in metrics],
    )


def add_checks(page: Page, checks: Mapping[str, Any]) -> None:
    """One line: the engine's self-checks, passed or skipped."""
    if not checks:
        return
    if "skipped" in checks:
        page.text(f"Self-checks skipped ({checks['skipped']}).")
        return
    passed = ", ".join(
        f"{name} ({r['max_abs_diff']:.2g} <= {r['tolerance']:.2g})"
        if name != "patch_all"
        else f"{name} ({r['max_abs_diff']:.2g} > {r['tolerance']:.2g})"
        for name, r in checks["results"].items()
    )
    page.text(f"Self-checks passed on {checks['pairs']} pairs in {checks['dtype']}: {passed}.")


def add_evaluation(page: Page, ev: Dict[str, Any]) -> None:
    """eval.json: necessity, sufficiency, areas and minimality under every ablation kind."""
    page.html.append("<h4>Evaluation (eval.json)</h4>")
    page.md += ["#### Evaluation (eval.json)", ""]
    data = ev["data"]
    page.text(
        f"Circuit {', '.join(ev['circuit'])} ({ev['n_units']} of {ev['n_components']} units, from {ev['source']}); "
        f"{data['n_test']} held-out pairs per desideratum, seed {data['seed']}; {ev['intervals']}. "
        f"Faithfulness = {ev['faithfulness']}. Conditions: "
        + "; ".join(f"{k}: {v}" for k, v in ev["conditions"].items())
        + "."
    )
    for caption, columns, rows in evaluation_tables(ev):
        page.text(caption)
        page.table(columns, rows)
    if ev["minimality"]["not_needed"]:
        page.text(f"Not needed on held-out pairs: {', '.join(ev['minimality']['not_needed'])}.")
    if "metrics" in ev:
        add_metrics_with_intervals(page, ev["metrics"], ev["metrics_ci"])
    if "checks" in ev:
        add_checks(page, ev["checks"])


def evaluation_only_report(path: Path, ev: Dict[str, Any]) -> Page:
    """The report of a `circuitfind eval` folder that holds no run: its evaluation alone."""
    page = Page(f"circuitfind evaluation: {path.name}", path)
    page.section(
        "evaluation",
        f"{ev['desiderata']} on {ev['data']['task']}, model {ev['model']['name_or_path'] or ev['model']['kind']}",
    )
    add_evaluation(page, ev)
    return page
