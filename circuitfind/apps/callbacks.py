"""Hydra callbacks of `circuitfind train`.

`SweepSummary` writes the sweep summary when a multirun ends (configs/train.yaml installs it).
`JobThreads` sets torch's thread count at the start of every job, in the job's own process:
launched jobs run side by side, and each one taking every core makes them all slower.
The launcher configs in configs/hydra/launcher/ install it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


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


class SweepSummary(Callback):
    """Writes the sweep summary (table and figure) when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from circuitfind.records.sweep import write_summary

        write_summary(Path(config.hydra.sweep.dir))
