"""Experiment tracking: metrics.jsonl always, Weights & Biases when `logger=wandb`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from circuitfind.config import LoggerConfig
from circuitfind.errors import CircuitfindError

WANDB_MODES = ("offline", "online", "disabled")


def _plain(value: Any) -> Any:
    """JSON-safe numbers (NaN and inf become strings, as JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Logs step metrics as JSON lines in the run directory and, optionally, to W&B."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: Dict[str, Any], name: str, group: Optional[str]):
        if cfg.backend not in ("none", "wandb"):
            raise CircuitfindError(f"logger.backend={cfg.backend!r} is unknown; use logger=wandb or logger=none")
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # Hydra makes it; a call from Python may not have
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.unlink(missing_ok=True)  # a re-run in the same directory starts a fresh log
        self.wandb = None
        if cfg.backend == "wandb":
            if cfg.mode not in WANDB_MODES:
                raise CircuitfindError(f"logger.mode={cfg.mode!r} is unknown; choose from {list(WANDB_MODES)}")
            import wandb

            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                mode=cfg.mode,
                dir=str(run_dir),
                config=config,
                name=name,
                group=group,
                tags=list(cfg.tags),
                reinit="finish_previous",  # multirun jobs share a process: one W&B run each
            )

    def log(self, metrics: Dict[str, float], step: int) -> None:
        # One complete line per write, flushed: a killed run leaves only whole lines.
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def table(self, key: str, columns: List[str], rows: List[List[Any]]) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows)})

    def image(self, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))})

    def close(self, failed: bool = False) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None
