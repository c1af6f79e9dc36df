"""The sweep summary: one table of every finished job (and the failed ones), and the paper's figure.

A sweep directory holds one job directory per point (`<num>_<swept key>=<value>,...`), each a
finished run with circuit.json (or `lam=<value>/` results), or a failed one with failed.json.
The swept keys are read from the sweep's own multirun.yaml, and each job's values from the
overrides it was run with, so the summary has a column per swept key.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from circuitfind.records import plots
from circuitfind.records.circuit import RECORD_FILE, CircuitRecord, headline_metrics, read_record
from circuitfind.records.files import write_json, write_text
from circuitfind.records.rundir import job_overrides

log = logging.getLogger(__name__)
FAILURE_FILE = "failed.json"


def write_failure(job_dir: Path, message: str) -> None:
    """Mark a sweep job as failed, with the one-line error that stopped it."""
    write_json(Path(job_dir) / FAILURE_FILE, {"status": "failed", "error": message})


def clear_failure(job_dir: Path) -> None:
    """A job that now finished (or is skipped as finished) is no longer a failed one."""
    (Path(job_dir) / FAILURE_FILE).unlink(missing_ok=True)


def parse_overrides(lines: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


def swept_keys(task_overrides: List[str]) -> List[str]:
    """The keys a sweep varies (`a=1,2`, `range(...)`, `choice(...)`), in command-line order, without `+`."""
    return [o.key_or_group for o in parse_overrides(task_overrides) if o.is_sweep_override()]


def sweep_spec(sweep_dir: Path) -> List[str]:
    """The overrides a sweep was started with (Hydra's multirun.yaml), or none."""
    path = Path(sweep_dir) / "multirun.yaml"
    return list(OmegaConf.load(path).hydra.overrides.task) if path.is_file() else []


def job_values(run: Path, keys: List[str]) -> Dict[str, str]:
    """The values a job was run with for the swept keys, from its .hydra/overrides.yaml."""
    given = {o.key_or_group: o.get_value_element_as_str() for o in parse_overrides(job_overrides(run))}
    return {k: given.get(k, "") for k in keys}


@dataclass
class Sweep:
    """What a sweep directory holds: its swept keys, its finished results and its failed jobs."""

    keys: List[str]
    runs: List[tuple[Path, CircuitRecord]] = field(default_factory=list)
    failed: List[Dict[str, str]] = field(default_factory=list)
    columns: List[str] = field(default_factory=list)  # of the summary table, once written
    rows: List[Dict[str, Any]] = field(default_factory=list)


def collect(sweep_dir: Path) -> Sweep:
    """Every finished result in a sweep directory (one level down, or two for `lam=<value>/`), and every failure."""
    sweep_dir = Path(sweep_dir)
    sweep = Sweep(keys=swept_keys(sweep_spec(sweep_dir)))
    for path in sorted(sweep_dir.glob(f"*/{FAILURE_FILE}")):
        sweep.failed.append({"run_dir": path.parent.name, "error": json.loads(path.read_text())["error"]})
    failed = {f["run_dir"] for f in sweep.failed}  # the latest request for these jobs failed: not their old results
    paths = sorted({*sweep_dir.glob(f"*/{RECORD_FILE}"), *sweep_dir.glob(f"*/lam=*/{RECORD_FILE}")})
    job_of = {path: path.relative_to(sweep_dir).parts[0] for path in paths}
    runs = [(path.parent, read_record(path.parent)) for path in paths if job_of[path] not in failed]
    sweep.runs = sorted(runs, key=lambda run: (run[1].lam is None, run[1].lam or 0.0, str(run[0])))
    return sweep


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def summary_columns(record: CircuitRecord) -> List[str]:
    """lambda, size, and the headline metrics of the record's desiderata."""
    return ["lam", "n_patched", *headline_metrics(record.evaluated)]


def write_summary(sweep_dir: Path) -> Sweep:
    """sweep_summary.csv / .md / .json and sweep_figure.png in the sweep directory."""
    sweep_dir = Path(sweep_dir)
    sweep = collect(sweep_dir)
    if not sweep.runs and not sweep.failed:
        log.warning(f"no finished job in {sweep_dir}; no sweep summary written")
        return sweep
    rows = [
        job_values(run, sweep.keys) | record.headline() | {"run_dir": str(run.relative_to(sweep_dir))}
        for run, record in sweep.runs
    ]
    columns = [*sweep.keys, *(summary_columns(sweep.runs[0][1]) if sweep.runs else []), "run_dir"]
    sweep.columns, sweep.rows = columns, rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "sweep_summary.csv", buf.getvalue())
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(format_value(r.get(c, "")) for c in columns) + " |" for r in rows]
    if sweep.failed:
        md += ["", f"{len(sweep.failed)} job(s) failed:", ""]
        md += [f"- {f['run_dir']}: {f['error']}" for f in sweep.failed]
    write_text(sweep_dir / "sweep_summary.md", "\n".join(md) + "\n")
    write_json(sweep_dir / "sweep_summary.json", rows)
    if sweep.failed:
        write_json(sweep_dir / "sweep_failed.json", sweep.failed)
    else:
        (sweep_dir / "sweep_failed.json").unlink(missing_ok=True)  # from an earlier, failed attempt
    if len(sweep.runs) > 1:
        plots.sweep_figure(rows, sweep.runs[0][1].titles, sweep_dir / "sweep_figure.png")
    log.info(f"sweep summary of {len(rows)} finished and {len(sweep.failed)} failed jobs written to {sweep_dir}")
    return sweep
