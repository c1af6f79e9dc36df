"""Print the README's evaluation tables from eval.json files: necessity, sufficiency and areas per
ablation kind on one split, then each circuit's minimality flags.

    python scripts/eval_summary.py outputs/eval13/dbm outputs/eval13/single_patch ... [--split io_test]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from circuitfind.records.evaluation import read_evaluation, with_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding eval.json (run or eval directories)")
    parser.add_argument("--split", help="the split to tabulate (default: the first desideratum's test split)")
    args = parser.parse_args()
    print(
        "| circuit | size | ablation | necessity: task acc drop | necessity: faithfulness | sufficiency: task acc | sufficiency: faithfulness | CPR | CMD |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    flags = []
    for folder in args.folders:
        ev = read_evaluation(folder)
        if ev is None:
            raise SystemExit(f"{folder} holds no eval.json")
        for kind, ablation in ev["ablations"].items():
            split = args.split or next(iter(ablation["splits"]))
            r = ablation["splits"][split]
            cells = [
                r["necessity"]["task_acc_drop"], r["necessity"]["faithfulness"],
                r["sufficiency"]["task_acc"], r["sufficiency"]["faithfulness"], r.get("cpr"), r.get("cmd"),
            ]  # fmt: skip
            print(f"| {folder.name} | {ev['n_units']} | {kind} | " + " | ".join(with_interval(c) for c in cells) + " |")
        flags.append(
            f"{folder.name}: {', '.join(ev['circuit'])}; not needed on held-out pairs: "
            f"{', '.join(ev['minimality']['not_needed']) or 'none'} (n = {ev['data']['n_test']} per split)"
        )
    print()
    print("\n".join(flags))


if __name__ == "__main__":
    main()
