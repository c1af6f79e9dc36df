"""eval.json: the tests of one circuit (study/circuit_eval.py), as log lines and report tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from circuitfind.errors import CircuitfindError

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


def evaluation_lines(ev: Dict[str, Any]) -> List[str]:
    """The log's summary: necessity and sufficiency on each held-out split, then minimality."""
    lines = []
    for kind, ablation in ev["ablations"].items():
        for split, r in ablation["splits"].items():
            if not split.endswith("_test"):
                continue  # the log keeps to the held-out splits; eval.json and the report have every split
            lines.append(
                f"{kind} ablation, {split}: necessity (circuit ablated) task acc drop "
                f"{with_interval(r['necessity']['task_acc_drop'])}, faithfulness {with_interval(r['necessity']['faithfulness'])}; "
                f"sufficiency (only the circuit kept) task acc {with_interval(r['sufficiency']['task_acc'])}, "
                f"faithfulness {with_interval(r['sufficiency']['faithfulness'])}"
                + (f"; CPR {with_interval(r['cpr'])}, CMD {with_interval(r['cmd'])}" if "cpr" in r else "")
            )
    flagged = ev["minimality"]["not_needed"]
    lines.append(
        f"minimality: {', '.join(flagged)} not needed on held-out pairs (leaving it out does not raise the objective "
        f"by a clear {ev['minimality']['min_share']:.0%} of the circuit's effect)"
        if flagged
        else f"minimality: each of the {ev['n_units']} units is needed on held-out pairs"
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
            [split, with_interval(r["cpr"]), with_interval(r["cmd"])]
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
    return tables
