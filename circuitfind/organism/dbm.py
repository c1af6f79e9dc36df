"""The built-in check: desiderata-based masking run on a freshly trained organism.

Each lambda is one `circuitfind train +desiderata=vd_oi` in a child process (the organism app
is a Hydra app itself), on the saved checkpoint; the found circuit is compared with the planted one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from circuitfind.records.circuit import SPLIT_KINDS, metric_key, read_record

log = logging.getLogger(__name__)


def dbm_args(lam: float, position: str = "last") -> List[str]:
    """The `circuitfind` arguments of the check at one lambda, as a user runs it on the shipped organism:
    units at the planted circuit's position. (Searched beside the final token as well, a circuit planted
    at x may give way to a smaller cut of the same route: the final-position heads that read x from there.)"""
    units = [] if position == "last" else [f'units.positions=["{position}"]']
    return ["train", "+desiderata=vd_oi", "model=organism", f"optimizer.lam={lam}", *units]


def run_dbm(checkpoint: Path, out_dir: Path, lams: Sequence[float], position: str = "last") -> List[Dict]:
    """One row per lambda: components patched, precision/recall against the checkpoint's planted circuit, accuracies."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HYDRA_FULL_ERROR": "1"}
    rows = []
    for lam in lams:
        run_dir = Path(out_dir) / f"lam_{lam:g}"
        args = dbm_args(lam, position) + [
            f"model.name_or_path={checkpoint}",
            "progress=false",
            f"hydra.run.dir={run_dir}",
        ]
        proc = subprocess.run([sys.executable, "-m", "circuitfind.cli", *args], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning("DBM check at lambda %g failed: %s", lam, error)
            rows.append({"lam": lam, "error": error})
            continue
        r = read_record(run_dir)
        first = r.evaluated[0]
        rows.append(
            {"lam": lam, "n_patched": r.n_patched, "n_components": r.n_components, "found": sorted(r.names)}
            | {k: r.planted[k] for k in ("precision", "recall")}
            | {
                f"{d}_{split}": r.metrics.get(metric_key(d, split, "acc"), float("nan"))
                for split in SPLIT_KINDS
                for d in r.evaluated
            }
            | {f"{first}_unpatched": r.baseline[metric_key(first, "test", "acc_unpatched")]}
        )
    return rows
