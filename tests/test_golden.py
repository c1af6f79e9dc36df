"""Golden runs: the default run and three variants on the shipped organism, at seed 0.

Each case runs the installed CLI and compares what a user reads (circuit, metrics, baseline,
planted scores, data fingerprint, evidence, and the continuous mask to 1e-6) with a record
kept in tests/golden/. A change that alters any of them on purpose re-records the files:

    CIRCUITFIND_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py

and says so, with before and after, in its commit message.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"
COMMON = ("+desiderata=vd_oi", "progress=false", "plots=false", "seed=0")
CASES = {
    "default": (),
    "lams": ("optimizer.lams=[0.01,0.05,0.2]",),
    "single_patch": ("method=single_patch", "method.k=5"),
    "evidence_full": ("evidence=full",),
}
RECORDED_KEYS = (
    "circuit", "n_patched", "n_components", "lam", "method", "metrics", "metrics_ci", "baseline", "baseline_ci",
    "planted", "data",
)  # fmt: skip
TOLERANCE = 1e-6


def snapshot(result_dir: Path) -> dict[str, Any]:
    """What a user reads of one result: circuit.json without timings, versions and self-check
    rounding, the masks, and the circuit's tests (eval.json)."""
    circuit = json.loads((result_dir / "circuit.json").read_text())
    masks = load_file(result_dir / "mask.safetensors")
    return {key: circuit[key] for key in RECORDED_KEYS} | {
        "mask": masks["continuous"].flatten().tolist(),
        "rounded": masks["rounded"].flatten().tolist(),
        "eval": json.loads((result_dir / "eval.json").read_text()),
    }


def run_snapshot(run_dir: Path) -> dict[str, Any]:
    """Every result of one run (one per lambda with optimizer.lams), and its evidence if any."""
    results = sorted(p.parent for p in run_dir.glob("**/circuit.json"))
    out: dict[str, Any] = {str(r.relative_to(run_dir)): snapshot(r) for r in results}
    if (run_dir / "evidence.json").is_file():
        out["evidence"] = json.loads((run_dir / "evidence.json").read_text())
    return out


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two JSON-like values differ; floats within TOLERANCE (absolute or relative) agree."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: missing" for k in expected.keys() - actual.keys()]
        out += [f"{path}/{k}: unexpected" for k in actual.keys() - expected.keys()]
        for key in expected.keys() & actual.keys():
            out += differences(expected[key], actual[key], f"{path}/{key}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool):
        if math.isclose(expected, actual, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
            return []
        return [f"{path}: {expected!r} != {actual!r}"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


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


def test_the_comparison_can_fail():
    """The golden comparison notices a moved mask weight, a changed circuit and a new key."""
    record = {"mask": [1.0, 0.25], "circuit": [{"name": "L2.H1"}], "metrics": {"vd_test/acc": 1.0}}
    assert not differences(record, json.loads(json.dumps(record)))
    assert differences(record, record | {"mask": [1.0, 0.25 + 2e-6]})
    assert differences(record, record | {"circuit": [{"name": "L2.H3"}]})
    assert differences(record, record | {"metrics": {"vd_test/acc": 1.0, "oi_test/acc": 1.0}})
