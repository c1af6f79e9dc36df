"""How far the golden runs move across thread counts and CPU kernels: the noise the golden tolerance must absorb.

Runs each golden case (tests/test_golden.py) under several settings of OMP_NUM_THREADS and
ATEN_CPU_CAPABILITY, one after another, and prints, against the recorded golden file, the largest
change of a continuous mask weight and of any other floating-point figure, and whether any
discrete result (a circuit, a size, a flagged unit) changed or a float moved beyond its tolerance. The tolerances in
tests/golden_records.py are set from these numbers.

    python scripts/golden_noise.py                 # every case, every setting (about 6 minutes on 2 cores)
    python scripts/golden_noise.py --cases default --settings t1 default_t2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from golden_records import GOLDEN, differences, run_snapshot  # noqa: E402
from test_golden import CASES, COMMON  # noqa: E402

SETTINGS = {
    "t1": {"OMP_NUM_THREADS": "1"},
    "t2": {"OMP_NUM_THREADS": "2"},
    "avx2_t1": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2"},
    "default_t1": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
    "default_t2": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default"},
}


def float_changes(expected, actual, path=""):
    """(path, |change|) of every float present in both."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in expected.keys() & actual.keys():
            yield from float_changes(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for i, (e, a) in enumerate(zip(expected, actual)):
            yield from float_changes(e, a, f"{path}[{i}]")
    elif isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        yield path, abs(expected - actual)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    exe = Path(sys.executable).with_name("circuitfind")
    print(f"{'case':14s} {'setting':11s} {'max mask change':>16s} {'max other change':>17s}  beyond tolerance")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            expected = json.loads((GOLDEN / f"{case}.json").read_text())
            for name in args.settings:
                run_dir = Path(tmp) / f"{case}_{name}"
                env = {**os.environ, **SETTINGS[name]}
                command = [str(exe), "train", *COMMON, *CASES[case], f"hydra.run.dir={run_dir}"]
                res = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
                if res.returncode:
                    print(f"{case:14s} {name:11s} failed: {res.stderr.strip()[-300:]}")
                    continue
                actual = run_snapshot(run_dir)
                changes = list(float_changes(expected, actual))
                mask = max((c for p, c in changes if p.endswith("]") and "/mask[" in p), default=0.0)
                other = max(((c, p) for p, c in changes if "/mask[" not in p), default=(0.0, ""))
                beyond = differences(expected, actual)  # discrete changes, and floats beyond their tolerance
                print(f"{case:14s} {name:11s} {mask:16.2e} {other[0]:17.2e}  {len(beyond):8d}  (largest at {other[1]})")


if __name__ == "__main__":
    main()
