"""The train config as the command line composes it: the schema registered, then Hydra's compose API."""

from __future__ import annotations

from typing import List

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from circuitfind.config.schema import TrainConfig


def register_configs() -> None:
    """Register the schema that the YAML files in `configs/` extend (configs/train.yaml names it)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def compose_train_config(overrides: List[str]) -> DictConfig:
    """The train config as `circuitfind train <overrides>` composes it (Hydra's compose API)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="circuitfind.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
