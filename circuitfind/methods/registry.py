"""`method=<name>`: the search methods by name (config/choices.py), each finding K masks its own way.

dbm           trains one sparse mask per lambda (methods/dbm.py)
single_patch  ranks the units (methods/baselines.py) and patches the top `method.k`
attribution   the same, ranked by a first-order estimate
random        the same, ranked at random
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import torch
from omegaconf import DictConfig

from circuitfind.config.choices import RANKING_METHODS, SEARCH_METHODS
from circuitfind.errors import CircuitfindError
from circuitfind.methods.baselines import component_scores, top_k_mask
from circuitfind.methods.dbm import OnStep, train_mask
from circuitfind.methods.objective import Objective
from circuitfind.model.engine import Engine


@dataclass
class Found:
    """What a method found: K masks, the ranking of the units each comes from, and the regularisation
    path's masks when one was trained (methods/ranking.py)."""

    masks: torch.Tensor  # (K, L, n_cols) continuous weights, 1 = keep
    scores: torch.Tensor  # (K, L, n_cols) higher = more important
    ladder: torch.Tensor | None = None  # (P, L, n_cols) the masks at optimizer.path_lams


@dataclass(frozen=True)
class MaskSearch:
    """Desiderata-based masking: a sparse mask trained per sparsity weight; its ranking is 1 - weight,
    and with optimizer.path_lams a ladder of lambdas is trained beside it (K + P masks side by side)."""

    name: str = "dbm"
    learns_mask: bool = True

    def find(
        self, engine: Engine, objectives: Sequence[Objective], lams: List[float], cfg: DictConfig, on_step: OnStep
    ) -> Found:
        k = len(lams)
        path = [float(v) for v in cfg.optimizer.path_lams or []]
        lam = torch.tensor(lams + path, dtype=torch.float32, device=engine.device)

        def own(step: int, mask: torch.Tensor, logs) -> None:  # the run's own K masks, not the ladder
            if on_step is not None:
                on_step(step, mask[:k], {key: v[:k] for key, v in logs.items()})

        mask = train_mask(engine, objectives, lam, cfg.optimizer, own, progress=cfg.progress, seed=cfg.seed)
        return Found(mask[:k], 1 - mask[:k], mask[k:] if path else None)


@dataclass(frozen=True)
class Ranking:
    """A ranking of the units by one score; the circuit is its top `method.k`. No sparsity weight."""

    name: str
    learns_mask: bool = False

    def find(
        self, engine: Engine, objectives: Sequence[Objective], lams: List[float], cfg: DictConfig, on_step: OnStep
    ) -> Found:
        """The top-k mask and the scores it comes from. (1, L, n_cols) each"""
        scores = component_scores(self.name, engine, objectives, engine.device, cfg.seed)
        return Found(top_k_mask(scores, cfg.method.k)[None], scores[None])


Method = Union[MaskSearch, Ranking]
METHODS: Dict[str, Method] = {
    **{name: MaskSearch(name) for name in SEARCH_METHODS},
    **{name: Ranking(name) for name in RANKING_METHODS},
}


def method_named(name: str) -> Method:
    """The method `method=<name>` runs."""
    if name not in METHODS:
        raise CircuitfindError(f"method={name!r} is unknown; choose from {list(METHODS)}")
    return METHODS[name]
