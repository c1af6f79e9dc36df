"""`circuitfind train`: the Hydra app around `runs/train.py` (config: configs/train.yaml).

A thin `@hydra.main`. A run owns its directory: it holds a lock on it from start to end (a second
run there stops with one line), an earlier run there is refused unless `overwrite=true`, and a
sweep re-run in the same `hydra.sweep.dir` skips the jobs that finished
with the same config. The config is checked, the data drawn and the model loaded before anything
is written; only then are the directory cleared and `.hydra/` written (Hydra's own copy is off,
`hydra.output_subdir: null`, so that a refused run cannot overwrite an earlier run's config).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from circuitfind.apps.callbacks import register_resolvers
from circuitfind.config.compose import register_configs
from circuitfind.config.schema import lambdas
from circuitfind.config.validation import normalised, validate
from circuitfind.errors import CircuitfindError
from circuitfind.records.circuit import CircuitRecord, read_record
from circuitfind.records.rundir import (
    clear_outputs,
    config_differences,
    discard_if_unused,
    owned,
    refuse_earlier_run,
    write_invocation,
)

register_configs()
register_resolvers()
log = logging.getLogger(__name__)


def finished_records(run_dir: Path, cfg: DictConfig) -> List[CircuitRecord] | None:
    """Every result of a finished job (circuit.json is written last, per lambda), or None."""
    dirs = [run_dir / f"lam={lam:g}" for lam in lambdas(cfg)] if cfg.optimizer.lams else [run_dir]
    try:
        records = [read_record(d) for d in dirs]
    except CircuitfindError:
        return None
    return records if all(r.status == "complete" for r in records) else None


def finished_with_this_config(run_dir: Path, cfg: DictConfig) -> bool:
    """True when the job finished with the requested config (skip it); False when it must run.

    A job that finished with another config is an error, unless overwrite=true re-runs it.
    """
    records = finished_records(run_dir, cfg)
    if records is None or cfg.overwrite:
        return False
    differences = config_differences(records[0].config, OmegaConf.to_container(cfg, resolve=True))
    if not differences:
        return True
    raise CircuitfindError(
        f"{run_dir} finished with another config ({'; '.join(differences[:4])}"
        f"{'; ...' if len(differences) > 4 else ''}); give another hydra.sweep.dir, or overwrite=true to re-run it"
    )


@hydra.main(config_path="pkg://circuitfind.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # torch, transformers and matplotlib only once Hydra has composed a config: --help and config
    # errors are answered without them
    from circuitfind.records.sweep import clear_failure, write_failure
    from circuitfind.runs.job import Job
    from circuitfind.runs.train import Interrupted, Run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        with owned(run_dir, "hydra.sweep.dir" if multirun else "hydra.run.dir"):  # for the whole run
            cfg = normalised(cfg)
            validate(cfg)
            if multirun and finished_with_this_config(run_dir, cfg):
                log.info(
                    f"skipping finished job {run_dir.name}: it finished with this config (overwrite=true re-runs it)"
                )
                clear_failure(run_dir)
                return
            if not multirun:
                refuse_earlier_run(run_dir, cfg.overwrite)
            run = Run(Job(cfg))  # data, model and unpatched baselines: bad input stops here, nothing written
            clear_outputs(run_dir)  # a refused or resumed run's leftovers: the run owns its directory
            write_invocation(run_dir, cfg, list(hc.overrides.task), hydra=hc)
            run.execute(run_dir, group=hc.sweep.dir if multirun else None)
    except CircuitfindError as e:
        discard_if_unused(run_dir)
        if multirun and not isinstance(e, Interrupted):  # the sweep goes on; its summary lists the failed jobs
            log.error(f"job {run_dir.name} failed: {e}")
            write_failure(run_dir, str(e))
            return
        print(f"circuitfind: error: {e}", file=sys.stderr)  # one line
        raise SystemExit(getattr(e, "exit_code", 1)) from None
