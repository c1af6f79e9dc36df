"""Experiment tracking: metrics.jsonl always, Weights & Biases when `logger=wandb`."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from circuitfind.config.schema import LoggerConfig
from circuitfind.network import reachable

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """JSON-safe numbers (NaN and inf become strings, as JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def has_api_key() -> bool:
    """Whether W&B can authenticate without asking: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str) -> str:
    """The W&B mode to use: WANDB_MODE from the environment wins; `online` without an API key or
    without a connection falls back to `offline` with a warning, instead of a traceback or a hang."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "online":
        return requested
    if not has_api_key():
        log.warning(
            "logger.mode=online but W&B has no API key (run `wandb login` or set WANDB_API_KEY); logging offline"
        )
        return "offline"
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not reachable(server):
        log.warning(
            f"logger.mode=online but {server} cannot be reached; logging offline (sync later with `wandb sync`)"
        )
        return "offline"
    return "online"


class Tracker:
    """Logs step metrics as JSON lines in the run directory and, optionally, to W&B."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: Dict[str, Any], name: str, group: Optional[str]):
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # Hydra makes it; a call from Python may not have
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.unlink(missing_ok=True)  # a re-run in the same directory starts a fresh log
        self.wandb = None
        if cfg.backend == "wandb":  # backend and mode are checked with the rest of the config (validation.py)
            self.wandb = start_wandb(cfg, run_dir, config, name, group)
        self.step = 0  # the last training step logged: images and tables are logged there

    def log(self, metrics: Dict[str, float], step: int) -> None:
        # One complete line per write, flushed: a killed run leaves only whole lines.
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self.step = step
        if self.wandb is not None:
            self.wandb.log({**metrics, "step": step}, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def table(self, key: str, columns: List[str], rows: List[List[Any]]) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows), "step": self.step}, step=self.step)

    def image(self, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path)), "step": self.step}, step=self.step)

    def close(self, failed: bool = False) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def start_wandb(cfg: LoggerConfig, run_dir: Path, config: Dict[str, Any], name: str, group: Optional[str], **kw):
    """A W&B run whose every metric is plotted against the training step."""
    import wandb

    mode = wandb_mode(cfg.mode)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=mode,
        dir=str(run_dir),
        config=config,
        name=name,
        group=group,
        tags=list(cfg.tags),
        reinit="finish_previous",  # multirun jobs share a process: one W&B run each
        settings=wandb.Settings(init_timeout=10),  # a server that accepts but never answers: give up in 10 s
        **kw,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def log_sweep_summary(cfg: LoggerConfig, sweep_dir: Path, columns: List[str], rows: List[List[Any]]) -> None:
    """The sweep summary table and figure as a W&B run of their own, in the sweep's group."""
    if cfg.backend != "wandb":
        return
    import wandb

    run = start_wandb(cfg, sweep_dir, {}, f"{sweep_dir} summary", str(sweep_dir), job_type="sweep_summary")
    try:
        run.log({"sweep_summary": wandb.Table(columns=columns, data=rows), "step": 0}, step=0)
        if (Path(sweep_dir) / "sweep_figure.png").is_file():
            run.log({"sweep_figure": wandb.Image(str(Path(sweep_dir) / "sweep_figure.png")), "step": 0}, step=0)
    finally:
        run.finish()
