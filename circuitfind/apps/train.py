"""`circuitfind train`: the Hydra app around `study.run.run_search` (config: configs/train.yaml).

A thin `@hydra.main`: it resumes sweeps (a finished job is skipped, an unfinished one cleared)
and turns a CircuitfindError into one line; the run itself is `run_search`, readable top to bottom.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from circuitfind.config import register_configs
from circuitfind.errors import CircuitfindError
from circuitfind.records.circuit import read_record
from circuitfind.study.run import lambdas, run_search

register_configs()
log = logging.getLogger(__name__)


def finished(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether a job already wrote every result: circuit.json is written last, per lambda."""
    dirs = [run_dir / f"lam={lam:g}" for lam in lambdas(cfg)] if cfg.optimizer.lams else [run_dir]
    for d in dirs:
        try:
            if read_record(d).status != "complete":
                return False
        except CircuitfindError:
            return False
    return True


def clear_unfinished(run_dir: Path) -> None:
    """Remove what an interrupted job left, so it re-runs from scratch (Hydra's .hydra/ and logs stay)."""
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" or entry.suffix == ".log":
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@hydra.main(config_path="pkg://circuitfind.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if multirun:  # re-running a sweep in the same hydra.sweep.dir resumes it
        if finished(run_dir, cfg):
            log.info(f"skipping finished job {run_dir.name}: its circuit.json is there (delete it to re-run)")
            return
        clear_unfinished(run_dir)
    try:
        run_search(cfg, run_dir, group=Path(hc.sweep.dir).name if multirun else None)
    except CircuitfindError as e:
        if multirun:
            raise  # Hydra finishes the other jobs, then reports which one failed
        raise SystemExit(f"circuitfind: error: {e}") from None  # one line, exit status 1
