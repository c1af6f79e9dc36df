"""Circuits found on tracr-compiled programs against the ground truth read off their compiled graphs.

Each row is one `circuitfind train` run (in this process): a program's task, one desideratum (vary the
first or the last input token), a unit space (heads and MLPs at the final token, or at every token),
and a method: DBM (the default search) or a baseline keeping as many units as the truth has (single_patch,
attribution). The truth is the smallest set of units that cuts every path from the varied token to the
output (model/tracr_truth.py); where there are several, the row says so and is scored against the nearest.

    pip install 'circuitfind[tracr]'
    python scripts/tracr_table.py                       # every program, both desiderata, both spaces (~5 min)
    python scripts/tracr_table.py --programs reverse sort --methods dbm
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List

PROGRAMS = ["frac_prevs", "reverse", "sort", "histogram", "hist_unused"]
DESIDERATA = {"tracr_vary_first": "t0", "tracr_vary_last": "t3"}
SPACES: Dict[str, List[str]] = {"final": [], "positions": ["units.positions=[t0,t1,t2,last]"]}
METHODS = ["dbm", "single_patch", "attribution"]
NO_PAIRS = {("reverse", "tracr_vary_last")}  # reverse's output at the last position is the first token only


def run(overrides: List[str], out: Path):
    from circuitfind.api import find_circuit

    (record,) = find_circuit(*overrides, "progress=false", "plots=false", run_dir=out)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=PROGRAMS, choices=PROGRAMS)
    parser.add_argument("--desiderata", nargs="+", default=list(DESIDERATA), choices=list(DESIDERATA))
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    print("| program | varied | units | truth (smallest cuts) | " + " | ".join(args.methods) + " | s |")
    print("|---|---|---|---|" + "---|" * len(args.methods) + "---|")
    notes: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for program in args.programs:
            t_program = time.perf_counter()
            for desideratum in args.desiderata:
                if (program, desideratum) in NO_PAIRS:
                    continue
                for space in args.spaces:
                    base = [f"task=tracr_{program}", "model=tracr", f"model.program={program}",
                            f"+desiderata={desideratum}", *SPACES[space]]  # fmt: skip
                    t, size, cells, truth = time.perf_counter(), None, [], None
                    for method in args.methods:
                        extra = [] if method == "dbm" else [f"method={method}", f"method.k={size}"]
                        record = run(base + extra, Path(tmp) / f"{program}-{desideratum}-{space}-{method}")
                        p = record.planted or {}
                        truth = truth or p
                        size = size or (len(p["circuits"][0]) if p.get("circuits") else record.n_patched) or 1
                        precision, recall = (
                            p.get(k) if p.get(k) is not None else float("nan") for k in ("precision", "recall")
                        )
                        cells.append(f"{', '.join(record.names) or '(none)'}: P {precision:.2f} R {recall:.2f}")
                    varied = DESIDERATA[desideratum]
                    if truth.get("why"):
                        notes[f"{program}, {varied} varied, {space}"] = truth["why"]
                    shown = " or ".join("{" + ", ".join(c) + "}" for c in truth.get("circuits") or []) or "none"
                    unique = "" if truth.get("unique", True) else " (not unique)"
                    print(f"| {program} | {varied} | {space} | {shown}{unique} | {' | '.join(cells)} | "
                          f"{time.perf_counter() - t:.1f} |", flush=True)  # fmt: skip
            print(f"<!-- {program}: {time.perf_counter() - t_program:.0f} s in all, compile included -->", flush=True)
    if notes:
        print("\nWhere the truth is not unique:")
        for where, why in notes.items():
            print(f"- {where}: {why}")


if __name__ == "__main__":
    main()
