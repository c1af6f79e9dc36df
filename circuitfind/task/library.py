"""The shipped tasks and desiderata (configs/task/, configs/desiderata/), loaded outside a Hydra run.

For scripts, benchmarks and tests: `load_task("ioi")`, `load_desiderata("ioi", task)` and
`sample_pairs(...)` give what `circuitfind train task=ioi` would use, without composing a run.
"""

from __future__ import annotations

import random
from typing import Any, List, Mapping

from omegaconf import OmegaConf

from circuitfind.config.choices import CONFIGS, shipped
from circuitfind.config.schema import DesiderataConfig, TaskConfig
from circuitfind.errors import CircuitfindError
from circuitfind.task.desiderata import Desideratum, desiderata_from
from circuitfind.task.pairs import Pair, make_pairs
from circuitfind.task.spec import TaskSpec


def _load(group: str, name: str, schema: type, overrides: Mapping[str, Any]) -> Any:
    path = CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        raise CircuitfindError(f"no {group} named {name!r}; choose from {shipped(group)}")
    cfg = OmegaConf.load(path)
    cfg.pop("defaults", None)
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), cfg, overrides), resolve=True)


def task_config(name: str, overrides: Mapping[str, Any] = {}) -> dict:
    """A shipped task's config as a dict, checked against the schema, with overrides merged in."""
    return _load("task", name, TaskConfig, overrides)


def load_task(name: str, overrides: Mapping[str, Any] = {}) -> TaskSpec:
    return TaskSpec(task_config(name, overrides))  # TaskSpec reads only the keys it knows


def default_desiderata(task_name: str) -> str | None:
    """The desiderata a shipped task names in its defaults list (`/desiderata@desiderata: <name>`)."""
    defaults = OmegaConf.load(CONFIGS / "task" / f"{task_name}.yaml").get("defaults") or []
    return next((e[k] for e in defaults if isinstance(e, Mapping) for k in e if k.startswith("/desiderata")), None)


def load_desiderata(name: str, task: TaskSpec) -> List[Desideratum]:
    """A shipped desiderata config's desiderata, checked against the task."""
    return desiderata_from(_load("desiderata", name, DesiderataConfig, {}), task)


def sample_pairs(task: TaskSpec, des: Desideratum, n: int, seed: int = 0, split: str = "train") -> List[Pair]:
    """n pairs of one desideratum, balanced, drawn from one split with a seeded generator."""
    (pairs,) = make_pairs(task, des, split, [n], random.Random(seed))
    return pairs
