"""Reading finished runs back: their config, results and component layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from circuitfind.errors import CircuitfindError


def finished_runs(path: Path) -> List[Path]:
    """The finished run directories at `path`: itself, or the jobs of a sweep in it."""
    path = Path(path)
    if not path.is_dir():
        raise CircuitfindError(f"{path} is not a directory; give a run or sweep directory under outputs/")
    if (path / "circuit.json").is_file():
        return [path]
    runs = sorted(p.parent for p in path.glob("*/circuit.json"))
    if not runs:
        raise CircuitfindError(
            f"{path} holds no finished run (no circuit.json in it or its subdirectories); "
            "finish a run with `circuitfind train +desiderata=vd_oi` first"
        )
    return runs


def load_result(run: Path) -> Dict[str, Any]:
    return json.loads((Path(run) / "circuit.json").read_text())


def load_config(run: Path) -> DictConfig:
    """The composed config a run was made with (Hydra saves it in .hydra/ of the job)."""
    for folder in (Path(run), Path(run).parent):  # lam=<value>/ results keep it one level up
        path = folder / ".hydra" / "config.yaml"
        if path.is_file():
            return OmegaConf.load(path)
    raise CircuitfindError(f"{run} has no .hydra/config.yaml; re-run it with `circuitfind train` to record its config")
