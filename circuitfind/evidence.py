"""Evidence that a circuit is the right one: baselines at equal size, faithfulness curves,
and stability across seeds and data resamples."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Sequence

import torch

from circuitfind.curves import faithfulness_curve
from circuitfind.evaluate import EvalSplit, evaluate_masks
from circuitfind.methods import SCORERS, random_scores, ranking, top_k_mask

HEADLINE = ("vd_test/acc", "oi_test/acc", "vd_transfer/acc", "oi_transfer/acc", "vd_test/logit_diff_norm")


@torch.no_grad()
def held_out_metrics(
    splits: Sequence[EvalSplit], engine, readout, masks: torch.Tensor, chunk: int = 16
) -> List[Dict[str, float]]:
    """The headline held-out metrics of each mask. (N, L, H+1) -> N dicts"""
    rows: List[Dict[str, float]] = [{} for _ in range(masks.shape[0])]
    for split in splits:
        for start, part in zip(itertools.count(0, chunk), masks.split(chunk)):
            for key, values in evaluate_masks(split, engine, readout, part).items():
                name = f"{split.name}/{key}"
                if name in HEADLINE:
                    for i, v in enumerate(values.tolist()):
                        rows[start + i][name] = v
    return rows


def component_scores(method: str, engine, readout, objectives, shape, device, seed: int) -> torch.Tensor:
    """Scores of every component by a baseline method (higher = patch first). (L, H+1)"""
    if method == "random":
        return random_scores(shape, device, torch.Generator().manual_seed(seed))
    return SCORERS[method](engine, readout, objectives, shape, device)


def compare_methods(
    dbm_mask: torch.Tensor,
    baselines: Sequence[str],
    ks: Sequence[int],
    random_draws: int,
    engine,
    readout,
    objectives,
    splits: Sequence[EvalSplit],
    seed: int,
    curves: bool,
) -> Dict[str, Any]:
    """Every method at the same circuit sizes, plus each method's faithfulness curve.

    DBM at its own size is its rounded mask; at other sizes, its top k by continuous weight.
    """
    shape = tuple(dbm_mask.shape)
    device = dbm_mask.device
    k_dbm = int((dbm_mask < 0.5).sum())
    n_components = shape[0] * shape[1]
    sizes = sorted({k for k in [*ks, k_dbm] if 1 <= k <= n_components})
    scores = {"dbm": -dbm_mask}  # a small weight means "patch first"
    for method in baselines:
        if method != "random":
            scores[method] = component_scores(method, engine, readout, objectives, shape, device, seed)
    table: List[Dict[str, Any]] = []
    for method, s in scores.items():
        masks = torch.stack([top_k_mask(s, k) for k in sizes])
        for k, row in zip(sizes, held_out_metrics(splits, engine, readout, masks)):
            table.append({"method": method, "k": k, **row})
    if "random" in baselines:
        draws = [
            component_scores("random", engine, readout, objectives, shape, device, seed + d)
            for d in range(random_draws)
        ]
        for k in sizes:
            rows = held_out_metrics(splits, engine, readout, torch.stack([top_k_mask(s, k) for s in draws]))
            summary: Dict[str, Any] = {"method": "random", "k": k, "draws": random_draws}
            for key in rows[0]:
                values = torch.tensor([r[key] for r in rows])
                summary[key] = float(values.mean())
                summary[f"{key}_std"] = float(values.std()) if len(rows) > 1 else 0.0
            table.append(summary)
        scores["random"] = draws[0]
    result: Dict[str, Any] = {"sizes": sizes, "dbm_size": k_dbm, "comparison": table, "ranked_by": "signed score"}
    if curves:
        test_splits = [s for s in splits if s.name.endswith("_test")]
        result["curves"] = {
            method: faithfulness_curve(ranking(s), test_splits, engine, readout, shape) for method, s in scores.items()
        }
    return result


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def stability(circuits: Dict[int, List[str]], names: List[str]) -> Dict[str, Any]:
    """How often each component is chosen across seeds, and the mean pairwise Jaccard similarity."""
    sets = {seed: set(c) for seed, c in circuits.items()}
    counts = {n: sum(n in s for s in sets.values()) / len(sets) for n in names}
    pairs = list(itertools.combinations(sets.values(), 2))
    return {
        "seeds": sorted(sets),
        "circuits": {str(seed): sorted(c) for seed, c in circuits.items()},
        "frequency": {n: f for n, f in sorted(counts.items(), key=lambda kv: -kv[1]) if f > 0},
        "mean_pairwise_jaccard": sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0,
        "sizes": {str(seed): len(c) for seed, c in circuits.items()},
    }


def run_stability(seeds: Sequence[int], find_circuit: Callable[[int], List[str]], names: List[str]) -> Dict[str, Any]:
    """Find the circuit again with each seed (fresh data draw and training) and compare."""
    return stability({seed: find_circuit(seed) for seed in seeds}, names)
