"""`circuitfind eval`: test a circuit, whoever found it (evaluation/circuit_tests.py).

  circuitfind eval <run directory>                  the run's circuit, with the run's config
  circuitfind eval +desiderata=vd_oi 'circuit=[L2.H1,L2.H3,L2.H4,L2.H6]'
  circuitfind eval task=ioi model=smollm2_135m circuit=path/to/mask.safetensors
  circuitfind eval ... circuit=path/to/mib_circuit.json  (a MIB node-level circuit file)

With a run directory, key=value options change the run's config (task.n_test=500,
evaluate.ablations=[zero,mean]) and the run's own circuit's eval.json is written into it (an
earlier one is kept as eval.<n>.json); another circuit's goes to outputs/eval/<date>/<time>, as
when the options compose a config as `circuitfind train` does (or to --out, which may not be a
finished run of another circuit). The report (report.html, report.md) is written beside it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Tuple

from circuitfind.errors import CircuitfindError
from circuitfind.progress import log_lines

log = logging.getLogger("circuitfind.eval")


def split_arguments(items: List[str]) -> Tuple[Path | None, str | None, List[str]]:
    """(run directory, circuit=..., the other overrides) from the command's free arguments."""
    runs = [i for i in items if "=" not in i]
    if len(runs) > 1:
        raise CircuitfindError(f"give one run directory, not {len(runs)} ({', '.join(runs)})")
    circuit = [i.split("=", 1)[1] for i in items if i.startswith("circuit=")]
    overrides = [i for i in items if "=" in i and not i.startswith("circuit=")]
    run = Path(runs[0]) if runs else None
    if run is not None and not run.is_dir():
        raise CircuitfindError(f"{run} is not a directory; give a finished run directory, or circuit=<names or file>")
    return run, (circuit[-1] if circuit else None), overrides


def circuit_spec(text: str):
    """`[L2.H1,L2.MLP]` -> a list of names; anything else is a path (or one name)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [name.strip().strip("'\"") for name in text[1:-1].split(",") if name.strip()]
    return text


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="circuitfind eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("items", nargs="*", help="a run directory, circuit=..., and key=value config options")
    parser.add_argument(
        "--n-test", type=int, help="held-out pairs per desideratum (task.n_test; raise it for tighter intervals)"
    )
    parser.add_argument(
        "--out", type=Path, help="where eval.json goes (default: the run directory, or outputs/eval/<date>/<time>)"
    )
    args = parser.parse_intermixed_args(argv)  # options and key=value items in any order
    run, circuit, overrides = split_arguments(args.items)
    if args.n_test is not None:
        if args.n_test < 1:
            raise CircuitfindError(f"--n-test {args.n_test}: give at least 1 held-out pair")
        overrides.append(f"task.n_test={args.n_test}")
    if run is None and circuit is None:
        raise CircuitfindError(
            "name the circuit to evaluate: circuitfind eval <run directory>, or circuit=[L2.H1,L2.H3] "
            "(unit names), circuit=<mask.safetensors> or circuit=<MIB circuit .json>"
        )
    log_lines()
    from circuitfind.runs.evaluate import evaluate_to  # torch and the model: only once the arguments are good

    if run is not None:
        from circuitfind.records.rundir import finished_runs

        models: dict = {}  # the runs of a sweep share their model: it is loaded once
        for one in finished_runs(run):
            spec = circuit_spec(circuit) if circuit else None
            report_written(evaluate_to(args.out, overrides, run=one, circuit=spec, models=models))
        return
    report_written(evaluate_to(args.out, overrides, run=None, circuit=circuit_spec(circuit)))


def report_written(done) -> None:
    print(f"evaluation written: {done.eval_json}; report: {done.report_html}, {done.report_md}")
