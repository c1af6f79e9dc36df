"""Finding finished runs on disk and the config each was made with."""

from __future__ import annotations

from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf

from circuitfind.errors import CircuitfindError
from circuitfind.records.circuit import RECORD_FILE


def finished_runs(path: Path) -> List[Path]:
    """The finished run directories at `path`: itself, or the jobs of a sweep in it."""
    path = Path(path)
    if not path.is_dir():
        raise CircuitfindError(f"{path} is not a directory; give a run or sweep directory under outputs/")
    if (path / RECORD_FILE).is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob(f"*/{RECORD_FILE}"))
    if not runs:
        raise CircuitfindError(
            f"{path} holds no finished run (no {RECORD_FILE} in it or its subdirectories); "
            "finish a run with `circuitfind train +desiderata=vd_oi` first"
        )
    return runs


def load_config(run: Path) -> DictConfig:
    """The composed config a run was made with (Hydra saves it in .hydra/ of the job)."""
    for folder in (Path(run), Path(run).parent):  # lam=<value>/ results keep it one level up
        path = folder / ".hydra" / "config.yaml"
        if path.is_file():
            return OmegaConf.load(path)
    raise CircuitfindError(f"{run} has no .hydra/config.yaml; re-run it with `circuitfind train` to record its config")
