"""The config's vocabulary: every name a key may take, with what it means.

The implementations key their registries on these names (model/engine.py, evaluation/ablation.py,
methods/registry.py, records/tracking.py), and tests check that each name has exactly one
implementation; validation checks a config against this file alone, so the config layer needs
nothing from the layers above it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

ENGINES: Dict[str, str] = {
    "cached": "the prefix before the earliest unit position runs once; each step runs only the suffix",
    "full": "the whole prompt runs at every step (the reference the cached engine is checked against)",
}
CACHE_POLICIES: Dict[str, str] = {
    "device": "prefix keys/values kept on the model's device for all steps (fastest)",
    "cpu": "kept in CPU memory and moved to the device per batch and step",
    "recompute": "not kept: the prefix is re-run without gradients at every step (least memory)",
}
UNIT_KINDS = ("heads_mlps", "residual", "neurons")
LAST = "last"  # units.positions: the final token
ALL = "all"  # units.positions: every token, counted from the end
ABLATIONS: Dict[str, str] = {
    "patching": "patched from the pair's alternate prompt (the paper's interchange)",
    "zero": "set to zero",
    "mean": "set to its mean over the reference prompts (the train pairs' base prompts)",
    "resample": "taken from a reference prompt drawn at random per pair (the train pairs' base prompts)",
}
NEEDS_REFERENCE = ("mean", "resample")  # ablations that read values off reference prompts
# A search method trains a mask per sparsity weight; a ranking method scores units and keeps the top k.
SEARCH_METHODS: Dict[str, str] = {"dbm": "desiderata-based masking: a sparse mask trained per lambda"}
RANKING_METHODS: Dict[str, str] = {
    "single_patch": "each unit patched alone: the objective's improvement",
    "attribution": "the objective's gradient at the unpatched model (first-order estimate of single_patch)",
    "random": "random scores (the floor every method must beat)",
}
METHODS: List[str] = [*SEARCH_METHODS, *RANKING_METHODS]
GATES: Dict[str, str] = {
    "clamp": "the paper's: w in [0, 1] trained directly and clamped, l0.5 penalty",
    "sigmoid": "w = sigmoid(m / T) with the temperature annealed, l1 penalty on what is patched",
    "hard_concrete": "stretched hard-concrete gates, sampled in training, L0 penalty on what is patched",
}
PRUNE_CRITERIA: Dict[str, str] = {
    "bound": "the smallest circuit whose objective stays within tolerance of the rounded mask's improvement",
    "price": "each unit must lower the objective by tolerance of the rounded mask's improvement",
}
BACKENDS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


def shipped(group: str) -> List[str]:
    """The names of a config group's shipped options (configs/<group>/*.yaml)."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
