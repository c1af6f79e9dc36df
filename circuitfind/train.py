"""`circuitfind train`: the Hydra app around `run.run_training` (config: configs/train.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from circuitfind.config import register_configs
from circuitfind.run import run_training

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    run_training(cfg, Path(hc.runtime.output_dir), group=group)
