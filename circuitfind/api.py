"""circuitfind from Python: one call runs a search as `circuitfind train` would and returns its records.

from circuitfind import find_circuit
records = find_circuit("+desiderata=vd_oi", "optimizer.lam=0.1")
records[0].names, records[0].metrics["vd_test/acc"]
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from circuitfind.config.compose import compose_train_config
from circuitfind.records.circuit import CircuitRecord
from circuitfind.records.rundir import clear_outputs, owned, refuse_earlier_run, unique_dir, write_invocation


def find_circuit(*overrides: str, run_dir: str | Path | None = None) -> List[CircuitRecord]:
    """Run one search (`circuitfind train <overrides>`) and return its records, one per lambda.

    The outputs go to `run_dir` (default `outputs/api/<date>/<time>`), which is created; like the
    command, it refuses a directory that holds an earlier run unless `overwrite=true` is given.
    Bad input raises CircuitfindError with a one-line message, before anything is written.
    """
    from circuitfind.config.validation import normalised, validate
    from circuitfind.runs.job import Job
    from circuitfind.runs.train import Run

    cfg = normalised(compose_train_config(list(overrides)))
    validate(cfg)
    run_dir = Path(run_dir) if run_dir is not None else unique_dir(Path("outputs/api"))
    with owned(run_dir, "run_dir"):
        refuse_earlier_run(run_dir, cfg.overwrite)
        run = Run(Job(cfg))
        clear_outputs(run_dir)
        write_invocation(run_dir, cfg, list(overrides))
        return run.execute(run_dir)


def evaluate_circuit(*overrides: str, circuit=None, run: str | Path | None = None, out_dir: str | Path | None = None):
    """Test a circuit as `circuitfind eval` does and return eval.json's contents.

    `run`: a finished run directory (its config and, unless `circuit` is given, its circuit);
    otherwise `overrides` compose the config and `circuit` is a list of unit names or the path of
    a mask.safetensors or MIB circuit file. eval.json goes to `out_dir` (default: the run
    directory for the run's own circuit, else `outputs/eval/<date>/<time>`).
    """
    import json

    from circuitfind.runs.evaluate import evaluate_to

    if run is None and circuit is None:
        from circuitfind.errors import CircuitfindError

        raise CircuitfindError("give circuit=[unit names] or a mask or MIB file path, or run=<run directory>")
    done = evaluate_to(
        Path(out_dir) if out_dir else None, list(overrides), run=Path(run) if run else None, circuit=circuit
    )
    return json.loads(done.eval_json.read_text())
