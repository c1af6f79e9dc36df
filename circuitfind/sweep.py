"""The multirun callback: after a lambda sweep, one table and the paper's figure."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from circuitfind import plots
from circuitfind.outputs import write_json, write_text

log = logging.getLogger(__name__)

# The headline numbers of a run, as the sweep summary and the report tabulate them.
SUMMARY_COLUMNS = (
    "lam",
    "n_patched",
    "vd_test/acc",
    "oi_test/acc",
    "vd_transfer/acc",
    "oi_transfer/acc",
    "vd_test/acc_model",
    "oi_test/acc_model",
    "vd_test/logit_diff_norm",
)
COLUMNS = [*SUMMARY_COLUMNS, "run_dir"]


def collect(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per finished job (a job is finished when its circuit.json exists)."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/circuit.json")):
        result = json.loads(path.read_text())
        rows.append(
            {"lam": result["lam"], "n_patched": result["n_patched"], **result["metrics"], "run_dir": path.parent.name}
        )
    return sorted(rows, key=lambda r: (r["lam"], r["run_dir"]))


def write_summary(sweep_dir: Path) -> List[Dict[str, Any]]:
    """sweep_summary.csv / .md / .json and sweep_figure.png in the sweep directory."""
    rows = collect(sweep_dir)
    if not rows:
        log.warning(f"no finished job in {sweep_dir}; no sweep summary written")
        return rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "sweep_summary.csv", buf.getvalue())
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    write_text(sweep_dir / "sweep_summary.md", "\n".join(md) + "\n")
    write_json(sweep_dir / "sweep_summary.json", rows)
    plots.sweep_figure(rows, sweep_dir / "sweep_figure.png")
    log.info(f"sweep summary of {len(rows)} jobs written to {sweep_dir}")
    return rows


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir))
