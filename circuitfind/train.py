"""`circuitfind train`: the Hydra app around `run.run_training` (config: configs/train.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from circuitfind.config import register_configs
from circuitfind.errors import CircuitfindError
from circuitfind.run import run_training

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_training(cfg, Path(hc.runtime.output_dir), group=Path(hc.sweep.dir).name if multirun else None)
    except CircuitfindError as e:
        if multirun:
            raise  # Hydra finishes the other jobs, then reports which one failed
        raise SystemExit(f"circuitfind: error: {e}") from None  # one line, exit status 1
