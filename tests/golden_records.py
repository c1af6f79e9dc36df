"""What a golden record holds of a run, and how a new run is compared with it.

Discrete results are compared exactly: circuits, sizes, the rounded mask, fingerprints, which
units minimality flags, every string, integer and boolean. Floating-point results are compared
to a tolerance measured across machines and thread counts (scripts/golden_noise.py):

- The four golden runs were repeated with 1 and 2 threads and with ATEN_CPU_CAPABILITY=avx2 and
  =default (no vector kernels). Against the record, a continuous mask weight moved by at most
  3.0e-6 and any other figure by at most 6.1e-5 (a bound of the minimality objective's interval,
  whose values reach 50: a relative change of 1e-6). On a CPU with AVX-512, mask[15] moved by
  1.7e-6. float32 rounding differs in the last bits between vector widths, BLAS kernels and
  reduction orders; 100 Adam steps carry those differences into the mask, and no seed removes them.
- MASK_TOLERANCE (1e-4, absolute; weights lie in [0, 1]) leaves a 30x margin over that noise and
  still catches a weight moved by 1e-3. VALUE_TOLERANCE (1e-3 absolute plus 1e-5 relative) leaves
  a 16x margin and still catches an accuracy moved by one pair (1/50 = 0.02) or a logit
  difference moved by 1e-2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"
RECORDED_KEYS = (
    "circuit", "n_patched", "n_components", "lam", "method", "metrics", "metrics_ci", "baseline", "baseline_ci",
    "planted", "data",
)  # fmt: skip
MASK_TOLERANCE = 1e-4  # absolute, on continuous mask weights
VALUE_TOLERANCE = (1e-3, 1e-5)  # absolute, relative: every other floating-point figure
EXACT_KEYS = ("rounded",)  # floats that are discrete results: the rounded mask is 0 or 1


def snapshot(result_dir: Path) -> Dict[str, Any]:
    """What a user reads of one result: circuit.json without timings, versions and self-check
    rounding, the masks, and the circuit's tests (eval.json)."""
    circuit = json.loads((result_dir / "circuit.json").read_text())
    masks = load_file(result_dir / "mask.safetensors")
    return {key: circuit[key] for key in RECORDED_KEYS} | {
        "mask": masks["continuous"].flatten().tolist(),
        "rounded": masks["rounded"].flatten().tolist(),
        "eval": json.loads((result_dir / "eval.json").read_text()),
    }


def run_snapshot(run_dir: Path) -> Dict[str, Any]:
    """Every result of one run (one per lambda with optimizer.lams), and its evidence if any."""
    results = sorted(p.parent for p in run_dir.glob("**/circuit.json"))
    out: Dict[str, Any] = {str(r.relative_to(run_dir)): snapshot(r) for r in results}
    if (run_dir / "evidence.json").is_file():
        out["evidence"] = json.loads((run_dir / "evidence.json").read_text())
    return out


def float_tolerance(path: str) -> tuple[float, float] | None:
    """(absolute, relative) tolerance of the float at `path`; None: compared exactly."""
    last = path.rsplit("/", 1)[-1].split("[", 1)[0]
    if last in EXACT_KEYS:
        return None
    if last == "mask":
        return MASK_TOLERANCE, 0.0
    return VALUE_TOLERANCE


def differences(expected: Any, actual: Any, path: str = "") -> List[str]:
    """Where two JSON-like values differ: discrete values exactly, floats within their tolerance."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: missing" for k in expected.keys() - actual.keys()]
        out += [f"{path}/{k}: unexpected" for k in actual.keys() - expected.keys()]
        for key in sorted(expected.keys() & actual.keys()):
            out += differences(expected[key], actual[key], f"{path}/{key}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, float) and math.isnan(expected) and math.isnan(actual):
        return []  # the same undefined figure
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        tolerance = float_tolerance(path)
        if tolerance is not None:
            absolute, relative = tolerance
            if math.isfinite(expected) and abs(expected - actual) <= absolute + relative * abs(expected):
                return []
    return [] if expected == actual and type(expected) is type(actual) else [f"{path}: {expected!r} != {actual!r}"]
