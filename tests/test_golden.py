"""Golden runs on the shipped organism, at seed 0: the default run (DBM, then pruning), at positions,
with every piece of evidence, and the paper's settings (`experiment=paper`: the records made before
pruning existed, which these runs must still reproduce), with several lambdas and a baseline.

Each case runs the installed CLI and compares what a user reads (circuit, metrics, baseline,
planted scores, data fingerprint, evidence, eval.json and the continuous mask) with a record kept
in tests/golden/: discrete results exactly, floats within a tolerance measured across CPUs and
thread counts (tests/golden_records.py). A change that alters any of them on purpose re-records
the files:

    CIRCUITFIND_RECORD_GOLDEN=1 python -m pytest -m e2e tests/test_golden.py

and says so, with before and after, in its commit message.
"""

from __future__ import annotations

import json
import os

import pytest

from golden_records import GOLDEN, MASK_TOLERANCE, differences, run_snapshot

COMMON = ("+desiderata=vd_oi", "progress=false", "plots=false", "seed=0")
CASES = {
    "default": (),
    "positions": ('units.positions=[last,x,"xname#2"]',),
    "evidence_full": ("evidence=full",),
    "paper": ("experiment=paper",),
    "paper_lams": ("experiment=paper", "optimizer.lams=[0.01,0.05,0.2]"),
    "paper_single_patch": ("experiment=paper", "method=single_patch", "method.k=5"),
    "paper_evidence_full": ("experiment=paper", "evidence=full"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(CASES))
def test_results_match_the_golden_record(case, cli, tmp_path):
    run_dir = tmp_path / case
    res = cli("train", *COMMON, *CASES[case], f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr
    actual = run_snapshot(run_dir)
    path = GOLDEN / f"{case}.json"
    if os.environ.get("CIRCUITFIND_RECORD_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1) + "\n")
    expected = json.loads(path.read_text())
    diff = differences(expected, actual)
    assert not diff, f"{case} differs from {path.name} in {len(diff)} places:\n" + "\n".join(diff[:20])


def test_the_comparison_ignores_cross_machine_noise_and_catches_real_changes():
    record = json.loads((GOLDEN / "paper.json").read_text())["."]
    same = json.loads(json.dumps(record))
    assert not differences(record, same)
    # Noise of the size measured across CPUs and thread counts passes ...
    noisy = json.loads(json.dumps(record))
    noisy["mask"][15] += 3e-6
    noisy["eval"]["minimality"]["units"][1]["objective_change"]["ci"][1] += 6.1e-5
    assert not differences(record, noisy)
    # ... a real change does not.
    moved = json.loads(json.dumps(record))
    moved["mask"][15] -= 1e-3
    assert differences(record, moved) == [f"/mask[15]: {record['mask'][15]!r} != {moved['mask'][15]!r}"]
    assert 1e-3 > MASK_TOLERANCE
    other_unit = json.loads(json.dumps(record))
    other_unit["circuit"][0]["name"] = "L0.H0"
    assert differences(record, other_unit)
    rounded = json.loads(json.dumps(record))
    rounded["rounded"][0] = 1.0 - rounded["rounded"][0]
    assert differences(record, rounded)
    one_pair = json.loads(json.dumps(record))
    one_pair["metrics"]["vd_test/acc"] -= 0.02  # one pair of 50
    assert differences(record, one_pair)
    flagged = json.loads(json.dumps(record))
    flagged["eval"]["minimality"]["not_needed"] = []
    assert differences(record, flagged)
    assert differences(record, record | {"extra": 1}) and differences(record | {"extra": 1}, record)
