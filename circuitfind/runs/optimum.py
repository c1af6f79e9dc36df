"""The best circuit of each small size, by exhaustive search (`circuitfind optimum <run>`).

On a small model (the organism has 36 components) every subset of components up to size k
can be tried; a search larger than --max-subsets is refused before anything is loaded. Each is scored by
the training objective (sum of weight * desideratum loss, no sparsity term) on the run's
held-out pairs; the gap between the run's circuit and the best subset of the same size
says how far from optimal the found circuit is.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import OmegaConf

from circuitfind.errors import CircuitfindError
from circuitfind.methods.objective import objective_of_masks
from circuitfind.model.masks import masks_of
from circuitfind.progress import progress
from circuitfind.records.circuit import read_record
from circuitfind.records.files import write_json
from circuitfind.records.rundir import load_config
from circuitfind.runs.job import Job


def n_subsets(n: int, k: int) -> int:
    return sum(math.comb(n, j) for j in range(k + 1))


def feasible_k(n: int, max_subsets: int) -> int:
    k = 0
    while k < n and n_subsets(n, k + 1) <= max_subsets:
        k += 1
    return k


def check_size(n_components: int, k: int, max_subsets: int) -> None:
    """Refuse searches that cannot finish, saying how large they are and what would do."""
    count = n_subsets(n_components, k)
    if count > max_subsets:
        feasible = feasible_k(n_components, max_subsets)
        raise CircuitfindError(
            f"exhaustive search over {n_components} components up to size {k} means {count:,} subsets "
            f"(limit --max-subsets {max_subsets:,}); k <= {feasible} is feasible: use --k {feasible}"
        )


def search(job, k: int, chunk: int = 256) -> Dict[int, Dict[str, Any]]:
    """Best subset of each size 0..k by held-out objective (lower is better)."""
    names = job.space.names()
    objectives = job.objectives(split="test")
    best: Dict[int, Dict[str, Any]] = {}
    with progress(n_subsets(len(names), k), "optimum: subsets scored", job.cfg.progress, "subset") as advance:
        for size in range(k + 1):
            best[size] = best_of_size(job, objectives, size, chunk, advance)
    return best


def best_of_size(job, objectives, size: int, chunk: int, advance) -> Dict[str, Any]:
    """The subset of `size` units with the lowest held-out objective, scored `chunk` at a time."""
    shape, names = job.space.shape, job.space.names()
    combos = itertools.combinations(range(len(names)), size)
    values, members = [], []
    while batch := list(itertools.islice(combos, chunk)):
        masks = masks_of(batch, shape, job.device)
        values.append(objective_of_masks(job.engine, objectives, masks, chunk).cpu())
        members += batch
        advance(len(batch))
    values_all = torch.cat(values)
    i = int(values_all.argmin())
    return {
        "components": [names[c] for c in members[i]],
        "objective": float(values_all[i]),
        "subsets": len(members),
        "median_objective": float(values_all.median()),
    }


def circuit_objective(job, circuit: List[str]) -> float:
    names = job.space.names()
    masks = masks_of([[names.index(c) for c in circuit]], job.space.shape, job.device)
    return float(objective_of_masks(job.engine, job.objectives(split="test"), masks)[0])


def run_optimum(run: Path, k: int, max_subsets: int) -> Dict[str, Any]:
    result = read_record(run)
    cfg = load_config(run)
    check_size(result.n_components, k, max_subsets)
    OmegaConf.set_struct(cfg, False)
    job = Job(cfg)
    t = time.perf_counter()
    best = search(job, k)
    found = result.names
    found_value = circuit_objective(job, found)
    size = len(found)
    out: Dict[str, Any] = {
        "k": k,
        "n_components": result.n_components,
        "objective": "sum of weight * desideratum loss on the held-out pairs (lower is better)",
        "best_by_size": {str(s): v for s, v in best.items()},
        "found": {"components": found, "size": size, "objective": found_value},
        "seconds": round(time.perf_counter() - t, 2),
    }
    if size in best:
        out["gap"] = found_value - best[size]["objective"]
        out["found_is_optimal"] = sorted(found) == sorted(best[size]["components"]) or out["gap"] <= 1e-6
    else:
        out["gap"] = None
        out["note"] = f"the found circuit has {size} components, more than k={k}: rerun with --k {size} if feasible"
    write_json(Path(run) / "optimum.json", out)
    return out
