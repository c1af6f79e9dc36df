"""The sweep summary: one table of every finished job and the paper's figure, in the sweep directory."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Dict, List

from circuitfind.records import plots
from circuitfind.records.circuit import RECORD_FILE, CircuitRecord, headline_metrics, read_record
from circuitfind.records.files import write_json, write_text

log = logging.getLogger(__name__)


def summary_columns(record: CircuitRecord) -> List[str]:
    """lambda, size, and the headline metrics of the record's desiderata."""
    return ["lam", "n_patched", *headline_metrics(record.evaluated)]


def collect(sweep_dir: Path) -> List[tuple[Path, CircuitRecord]]:
    """Every finished job of a sweep (a job is finished when its circuit.json exists), by lambda."""
    runs = [(path.parent, read_record(path.parent)) for path in sorted(Path(sweep_dir).glob(f"*/{RECORD_FILE}"))]
    return sorted(runs, key=lambda run: (run[1].lam, run[0].name))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def write_summary(sweep_dir: Path) -> List[Dict[str, Any]]:
    """sweep_summary.csv / .md / .json and sweep_figure.png in the sweep directory."""
    runs = collect(sweep_dir)
    if not runs:
        log.warning(f"no finished job in {sweep_dir}; no sweep summary written")
        return []
    rows = [record.headline() | {"run_dir": run.name} for run, record in runs]
    columns = [*summary_columns(runs[0][1]), "run_dir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "sweep_summary.csv", buf.getvalue())
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(format_value(r.get(c, "")) for c in columns) + " |" for r in rows]
    write_text(sweep_dir / "sweep_summary.md", "\n".join(md) + "\n")
    write_json(sweep_dir / "sweep_summary.json", rows)
    plots.sweep_figure(rows, runs[0][1].evaluated, sweep_dir / "sweep_figure.png")
    log.info(f"sweep summary of {len(rows)} jobs written to {sweep_dir}")
    return rows
