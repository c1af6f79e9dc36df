"""Evidence that a circuit is the right one: baselines at equal size, faithfulness curves,
and stability across seeds and data resamples."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Sequence

import torch

from circuitfind.evaluation.bootstrap import as_pair
from circuitfind.evaluation.curves import faithfulness_curve
from circuitfind.evaluation.heldout import EvalSplit, pair_outcomes
from circuitfind.methods.baselines import component_scores, ranking, top_k_mask
from circuitfind.model.engine import Engine
from circuitfind.records.circuit import headline_metrics


def evaluated_names(splits: Sequence[EvalSplit]) -> List[str]:
    return list(dict.fromkeys(s.desideratum.name for s in splits))


@torch.no_grad()
def held_out_metrics(
    splits: Sequence[EvalSplit], engine, masks: torch.Tensor, chunk: int = 16, intervals: bool = False
) -> List[Dict[str, Any]]:
    """The headline held-out metrics of each mask (with `intervals`, also `<key>_ci`: 95% bootstrap
    [low, high] over pairs). (N, L, H+1) -> N dicts"""
    headline = set(headline_metrics(evaluated_names(splits), model_acc=False))
    rows: List[Dict[str, Any]] = [{} for _ in range(masks.shape[0])]
    for split in splits:
        for start, part in zip(itertools.count(0, chunk), masks.split(chunk)):
            outcomes = pair_outcomes(split, engine, part)
            bounds = outcomes.intervals() if intervals else {}
            for metric, values in outcomes.metrics().items():
                if split.key(metric) in headline:
                    for i, v in enumerate(values.tolist()):
                        rows[start + i][split.key(metric)] = v
                        if intervals:
                            rows[start + i][f"{split.key(metric)}_ci"] = as_pair(bounds[metric][i])
    return rows


def random_rows(scores: List[torch.Tensor], sizes: Sequence[int], splits, engine) -> List[Dict[str, Any]]:
    """Mean and spread of the headline metrics over random circuits, at each size."""
    table = []
    for k in sizes:
        rows = held_out_metrics(splits, engine, torch.stack([top_k_mask(s, k) for s in scores]))
        summary: Dict[str, Any] = {"method": "random", "k": k, "draws": len(scores)}
        for key in rows[0]:
            values = torch.tensor([r[key] for r in rows])
            summary[key] = float(values.mean())
            summary[f"{key}_std"] = float(values.std()) if len(rows) > 1 else 0.0
        table.append(summary)
    return table


def compare_methods(
    dbm_scores: torch.Tensor,
    dbm_circuit: torch.Tensor,
    evidence,
    engine,
    objectives,
    splits: Sequence[EvalSplit],
    seed: int,
):
    """Every method of `evidence.baselines` at the same circuit sizes, and each ranking's faithfulness curve.

    DBM at its own size is the circuit the run reports; at other sizes, the top k of its ranking.
    dbm_scores (L, n_cols): higher = more important; dbm_circuit (L, n_cols): 0 = in the circuit."""
    device = dbm_scores.device
    k_dbm = int((dbm_circuit == 0).sum())
    sizes = sorted({k for k in [*evidence.ks, k_dbm] if 1 <= k <= engine.space.n_components})
    scores = {"dbm": dbm_scores}
    for method in evidence.baselines:
        if method != "random":
            scores[method] = component_scores(method, engine, objectives, device, seed)
    table: List[Dict[str, Any]] = []
    if "random" in evidence.baselines:
        draws = [component_scores("random", engine, objectives, device, seed + d) for d in range(evidence.random_draws)]
        scores["random"] = draws[0]  # the curve follows the first draw
    if sizes:  # an empty circuit and no evidence.ks leave no size to compare at
        for method, s in scores.items():
            if method == "random":
                table += random_rows(draws, sizes, splits, engine)
                continue
            masks = torch.stack([top_k_mask(s, k) for k in sizes])
            if method == "dbm" and k_dbm in sizes:
                masks[sizes.index(k_dbm)] = dbm_circuit.to(masks)
            for k, row in zip(sizes, held_out_metrics(splits, engine, masks, intervals=True)):
                table.append({"method": method, "k": k, **row})
    result: Dict[str, Any] = {"sizes": sizes, "dbm_size": k_dbm, "comparison": table, "ranked_by": "signed score"}
    if evidence.curves:
        test_splits = [s for s in splits if s.kind == "test"]
        result["curves"] = {method: faithfulness_curve(ranking(s), test_splits, engine) for method, s in scores.items()}
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


def gather_evidence(
    engine: Engine,
    splits: Sequence[EvalSplit],
    objectives,
    scores: torch.Tensor,
    circuit: torch.Tensor,
    evidence,
    seed: int,
    refind: Callable[[int], List[str]],
) -> Dict[str, Any]:
    """Baselines at equal size, faithfulness curves and stability of a DBM result: its ranking and circuit.

    `evidence` is the evidence config; `refind(seed)` is the same search's circuit (unit names) on
    data drawn with another seed (stability)."""
    result = compare_methods(scores, circuit, evidence, engine, objectives, splits, seed)
    if evidence.stability_seeds:
        names = engine.space.names()
        own = [n for n, w in zip(names, circuit.flatten().tolist()) if w == 0]
        seeds = [seed + i for i in range(evidence.stability_seeds)]
        result["stability"] = run_stability(seeds, lambda other: own if other == seed else refind(other), names)
    return result
