"""Hydra callbacks and resolvers of `circuitfind train` sweeps.

`SweepSummary` (installed by configs/train.yaml) refuses to reuse a sweep directory made with
another config, shows the sweep's progress with an ETA, and writes the sweep summary when the
sweep ends, listing the failed jobs (the sweep then exits with status 1). Hydra turns an
exception raised in a callback into a warning, so these stop the sweep with SystemExit.
`JobThreads` sets torch's thread count at the start of every job, in the job's own process:
launched jobs run side by side, and each one taking every core makes them all slower.
The launcher configs in configs/hydra/launcher/ install it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def swept_dirname(sweep_dir: str, task_overrides: List[str]) -> str:
    """A job directory's name: the swept keys' values (`lam=0.02,seed=1`), read against the sweep's multirun.yaml."""
    from circuitfind.records.sweep import parse_overrides, sweep_spec, swept_keys

    keys = set(swept_keys(sweep_spec(Path(sweep_dir))))
    parts = [
        f"{o.key_or_group.split('.')[-1]}={o.get_value_element_as_str()}"
        for o in parse_overrides(list(task_overrides))
        if o.key_or_group in keys
    ]
    return ",".join(parts) or "job"


def register_resolvers() -> None:
    """`${circuitfind_swept:${hydra.sweep.dir},${hydra.overrides.task}}` names sweep job directories."""
    if not OmegaConf.has_resolver("circuitfind_swept"):
        OmegaConf.register_new_resolver("circuitfind_swept", swept_dirname)


def n_jobs(task_overrides: List[str]) -> int:
    """How many jobs a sweep over these overrides launches (the product of the swept values)."""
    from circuitfind.records.sweep import parse_overrides

    return math.prod(
        len(list(o.sweep_string_iterator())) for o in parse_overrides(task_overrides) if o.is_sweep_override()
    )


def base_config(config: DictConfig) -> dict:
    """The config shared by every job of a sweep (Hydra's node left out)."""
    plain = OmegaConf.to_container(config, resolve=False)
    plain.pop("hydra", None)
    return plain


def stop(message: str) -> None:
    """End the sweep with one line and exit status 1 (SystemExit passes through Hydra's callback guard)."""
    print(f"circuitfind: error: {message}", file=sys.stderr)
    raise SystemExit(1)


class SweepSummary(Callback):
    """Checks a reused sweep directory, shows progress, and writes the sweep summary at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from circuitfind.records.rundir import config_differences

        earlier = Path(config.hydra.sweep.dir) / "multirun.yaml"
        if earlier.is_file() and not config.get("overwrite", False):
            differences = config_differences(base_config(OmegaConf.load(earlier)), base_config(config))
            if differences:
                stop(
                    f"{earlier.parent} holds a sweep made with another config ({'; '.join(differences[:4])}); "
                    "give another hydra.sweep.dir, or overwrite=true to re-run its jobs"
                )
        self.total = n_jobs(list(config.hydra.overrides.task))
        self.done, self.started = 0, time.monotonic()

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not hasattr(self, "total"):  # a launcher that runs jobs in other processes
            return
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        log.info(f"sweep: {self.done} of {self.total} jobs done, {elapsed:.0f} s so far, about {eta:.0f} s to go")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from circuitfind.records.sweep import write_summary
        from circuitfind.records.tracking import log_sweep_summary

        sweep = write_summary(Path(config.hydra.sweep.dir))
        if sweep.rows:
            table = [[row.get(c) for c in sweep.columns] for row in sweep.rows]
            log_sweep_summary(config.logger, Path(config.hydra.sweep.dir), sweep.columns, table)
        if sweep.failed:
            first = sweep.failed[0]
            stop(
                f"{len(sweep.failed)} sweep job(s) failed "
                f"(first: {first['run_dir']}: {first['error']}); the summary in {config.hydra.sweep.dir} "
                "covers the finished ones"
            )


class JobThreads(Callback):
    """torch.set_num_threads(num_threads) when a job starts (OMP/MKL variables too, for child processes)."""

    def __init__(self, num_threads: int | None = 1):
        self.num_threads = num_threads

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.num_threads:
            return
        import torch

        n = int(self.num_threads)
        torch.set_num_threads(n)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)
        log.info(f"torch threads for this job: {torch.get_num_threads()}")
