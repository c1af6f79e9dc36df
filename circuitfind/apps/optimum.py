"""`circuitfind optimum <run>`: the best circuit of each small size, by exhaustive search.

On a small model (the organism has 36 components) every subset of components up to size k
can be tried; a search larger than --max-subsets is refused before anything is loaded. Each is scored by
the training objective (sum of weight * desideratum loss, no sparsity term) on the run's
held-out pairs; the gap between the run's circuit and the best subset of the same size
says how far from optimal the found circuit is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from circuitfind.errors import CircuitfindError
from circuitfind.progress import log_lines
from circuitfind.records.rundir import finished_runs


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="circuitfind optimum", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a finished run directory (with circuit.json)")
    parser.add_argument("--k", type=int, default=4, help="largest subset size searched (default 4)")
    parser.add_argument("--max-subsets", type=int, default=500_000, help="refuse searches larger than this")
    args = parser.parse_args(argv)
    if args.k < 0:
        raise CircuitfindError(f"--k {args.k}: give a size >= 0")
    log_lines()
    from circuitfind.runs.optimum import run_optimum  # torch and the model: only once the arguments are good

    for run in finished_runs(args.run):
        out = run_optimum(run, args.k, args.max_subsets)
        found = f"{run}: found {out['found']['size']} components, held-out objective {out['found']['objective']:.4f}"
        verdict = (
            out.get("note")
            if out["gap"] is None
            else (
                f"the best subset of that size is {out['gap']:.4f} lower"
                + (" (the found circuit is optimal)" if out["found_is_optimal"] else "")
            )
        )
        print(f"{found}; {verdict}; written {run / 'optimum.json'}")
