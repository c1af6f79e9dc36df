"""Bootstrap 95% intervals over prompts: every figure is a mean (or a ratio of means) over pairs,
recomputed on resamples of the pairs drawn with replacement."""

from __future__ import annotations

from typing import Callable, List

import torch

DRAWS = 1000  # resamples per interval
LEVEL = 0.95


def resamples(n: int, draws: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """Pair indices of `draws` resamples of n pairs, with replacement; the same seed gives the same draws. (R, N)"""
    return torch.randint(0, n, (draws, n), generator=torch.Generator().manual_seed(seed))


def resampled_means(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The mean over pairs of each resample. values (..., N), index (R, N) -> (..., R)"""
    return values.float()[..., index].mean(dim=-1)


def percentile_interval(stats: torch.Tensor) -> torch.Tensor:
    """The central LEVEL interval of resampled statistics. (..., R) -> (..., 2)"""
    tail = (1 - LEVEL) / 2
    q = torch.tensor([tail, 1 - tail], dtype=stats.dtype)
    return torch.quantile(stats, q, dim=-1).movedim(0, -1)


def interval(statistic: Callable[[torch.Tensor], torch.Tensor], n: int, draws: int = DRAWS, seed: int = 0):
    """The 95% interval of `statistic(index)` over resamples of n pairs; statistic maps (R, N) -> (..., R)."""
    return percentile_interval(statistic(resamples(n, draws, seed)))


def rounded(value) -> float:
    """A figure as records keep it: six decimals, and no negative zero."""
    return round(float(value), 6) + 0.0


def as_pair(bounds: torch.Tensor) -> List[float]:
    """[low, high] rounded for a record. (2,) -> list"""
    return [rounded(bounds[0]), rounded(bounds[1])]


def estimates(statistic: Callable[[torch.Tensor], dict], n: int, draws: int = DRAWS, seed: int = 0) -> dict:
    """Point value and 95% interval of each named figure; statistic maps a resample index (R, N) to
    {name: (R,)}, and on the identity index gives the point values. -> {name: {"value", "ci"}}"""
    point = statistic(torch.arange(n)[None])
    stats = statistic(resamples(n, draws, seed))
    return {name: {"value": rounded(point[name][0]), "ci": as_pair(percentile_interval(stats[name]))} for name in point}
