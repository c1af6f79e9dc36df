"""MIB's areas of each method's ranking of every unit, under patching and mean ablation: DBM's own
weights, DBM's regularisation path (optimizer.path_lams), single_patch and attribution.

Each row is one `circuitfind train` run (in this process, one after another) whose end-of-run
evaluation computes the faithfulness curve of its ranking on the held-out test split (CPR: area
under it, higher is better; CMD: area between it and 1, lower is better).

    python scripts/ranking_table.py                                        # the organism (about a minute)
    python scripts/ranking_table.py task=ioi model=smollm2_135m optimizer.lam=0.3 --k 6   # SmolLM2 IOI
    python scripts/ranking_table.py --rankings path attribution                     # some rows only
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

PATH = "optimizer.path_lams=[0.003,0.01,0.03,0.1,1.0]"
RANKINGS = ["weights", "path", "single_patch", "attribution"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="the baselines' circuit size (DBM's own, to compare)")
    parser.add_argument("--ablations", nargs="+", default=["mean"], help="besides patching")
    parser.add_argument("--rankings", nargs="+", choices=RANKINGS, default=RANKINGS, help="the rows to run")
    parser.add_argument("overrides", nargs="*", help="overrides for every run (task=..., model=..., optimizer.lam=...)")
    args = parser.parse_intermixed_args()
    logging.disable(logging.INFO)
    from circuitfind.api import find_circuit

    every = {
        "weights": ("dbm (weights)", []),
        "path": ("dbm (regularisation path)", [PATH]),
        "single_patch": ("single_patch", ["method=single_patch", f"method.k={args.k}"]),
        "attribution": ("attribution", ["method=attribution", f"method.k={args.k}"]),
    }
    rows = dict(every[key] for key in args.rankings)
    ablations = f"evaluate.ablations=[{','.join(args.ablations)}]"
    print(f"{'ranking':28s} {'size':>4s} {'ablation':9s} {'split':12s} {'CPR':>6s} {'CMD':>6s} {'time s':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in rows.items():
            t = time.perf_counter()
            out = Path(tmp) / name.replace(" ", "_")
            (record,) = find_circuit(*args.overrides, *extra, ablations, "progress=false", "plots=false", run_dir=out)
            seconds = time.perf_counter() - t
            raw = f" (rounded mask {record.raw['n_patched']})" if record.raw else ""
            timing = record.timing
            print(
                f"# {name}: {record.names}{raw}; train {timing.get('train_s', 0):.1f} s, "
                f"prune {timing.get('prune_s', 0):.2f} s"
            )
            ev = json.loads((out / "eval.json").read_text())
            for kind, ablation in ev["ablations"].items():
                for split, figures in ablation["splits"].items():
                    if figures.get("areas_undefined"):
                        print(f"{name:28s} {ev['n_units']:4d} {kind:9s} {split:12s} {'undefined':>13s} {seconds:7.0f}")
                    elif "cpr" in figures:
                        cpr, cmd = figures["cpr"]["value"], figures["cmd"]["value"]
                        print(
                            f"{name:28s} {ev['n_units']:4d} {kind:9s} {split:12s} {cpr:6.2f} {cmd:6.2f} {seconds:7.0f}"
                        )


if __name__ == "__main__":
    main()
