"""The search compared across unit spaces, gate forms and pruning, on a model with a planted circuit.

Each row is one `circuitfind train` run (in this process, one after another) on the shipped
organism by default: the circuit's size, its precision and recall against the planted circuit,
held-out accuracies and time, for the raw rounded mask and for the pruned circuit; with several
seeds, the Jaccard of their circuits and the cost, pruning's time over the search's (median over seeds).

    python scripts/search_table.py                               # every space x gate, pruned (a few minutes)
    python scripts/search_table.py --gates clamp --spaces default x_last
    python scripts/search_table.py --seeds 0 1 2 3 4             # stability: Jaccard over seeds per row
    python scripts/search_table.py --gates clamp --spaces pos_xname2 pos_xname2_last pos_residual   # the positional organism
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

SPACES: Dict[str, List[str]] = {
    "default": [],
    "x_last": ["units.positions=[last,x]"],
    "x_xname2_last": ['units.positions=[last,x,"xname#2"]'],
    "residual": ["units=residual", 'units.positions=[x,"xname#2",last]'],
    "residual_all": ["units=residual"],
    # the positional organism: its circuit planted at the query's x (xname#2), read at the final token
    "pos_xname2": ["model=organism_positional", 'units.positions=["xname#2"]'],
    "pos_xname2_last": ["model=organism_positional", 'units.positions=["xname#2",last]'],
    "pos_x_xname2_last": ["model=organism_positional", 'units.positions=[last,x,"xname#2"]'],
    "pos_residual": ["model=organism_positional", "units=residual", 'units.positions=[x,"xname#2",last]'],
}
# the sigmoid and hard-concrete gates want a larger step than the clamp's 0.01: at 0.01 their
# logits move by at most 1 in 100 steps, and they patch nothing
GATES = {"clamp": [], "sigmoid": ["optimizer.lr=0.1"], "hard_concrete": ["optimizer.lr=0.1"]}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def run(overrides: List[str], out: Path) -> dict:
    from circuitfind.api import find_circuit

    t = time.perf_counter()
    (record,) = find_circuit(*overrides, "progress=false", "plots=false", run_dir=out)
    row = {
        "size": record.n_patched,
        "circuit": record.names,
        "precision": (record.planted or {}).get("precision"),
        "recall": (record.planted or {}).get("recall"),
        "raw_size": record.raw.get("n_patched", record.n_patched),
        "raw_precision": (record.raw.get("planted") or record.planted or {}).get("precision"),
        "wall_s": round(time.perf_counter() - t, 1),
        "train_s": record.timing["train_s"],
        "prune_s": record.timing.get("prune_s", 0.0),
        "circuits_scored": (record.pruning or {}).get("circuits_scored"),
        "screening": (record.pruning or {}).get("screening"),
    }
    for key, value in record.metrics.items():
        if key.endswith("/acc") and not key.startswith("continuous"):
            row[key] = value
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", default=list(SPACES)[:5], choices=list(SPACES))
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--prune", nargs="+", default=["validation"], choices=["validation", "stable", "none"])
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run (model=..., optimizer.lam=...)")
    args = parser.parse_intermixed_args()
    logging.disable(logging.INFO)
    rows = []
    print(f"{'space':14s} {'gate':13s} {'prune':10s} {'size':>4s} {'raw':>4s} {'P':>5s} {'R':>5s} "
          f"{'VD':>5s} {'OI':>5s} {'xfer':>5s} {'Jacc':>5s} {'train s':>7s} {'prune s':>7s} {'cost':>5s}  circuit")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for space, gate, prune in itertools.product(args.spaces, args.gates, args.prune):
            found = []
            for seed in args.seeds:
                overrides = [
                    *args.overrides,
                    *SPACES[space],
                    f"optimizer.gate={gate}",
                    *GATES[gate],
                    f"prune={prune}",
                    f"seed={seed}",
                ]
                row = run(overrides, Path(tmp) / f"{space}_{gate}_{prune}_{seed}")
                found.append(row)
                rows.append({"space": space, "gate": gate, "prune": prune, "seed": seed, **row})
            pairs = list(itertools.combinations([set(r["circuit"]) for r in found], 2))
            jac = sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else None
            first = found[0]
            cost = statistics.median(r["prune_s"] / r["train_s"] for r in found)  # pruning's time over the search's

            def fmt(v):
                return "    -" if v is None else f"{v:5.2f}"

            print(
                f"{space:14s} {gate:13s} {prune:10s} {first['size']:4d} {first['raw_size']:4d} "
                f"{fmt(first['precision'])} {fmt(first['recall'])} {fmt(first.get('vd_test/acc'))} "
                f"{fmt(first.get('oi_test/acc'))} {fmt(first.get('vd_transfer/acc'))} {fmt(jac)} "
                f"{first['train_s']:7.1f} {first['prune_s']:7.2f} {cost:5.2f}  {' '.join(first['circuit'][:8])}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
