"""Choosing the circuit's size: the lambda that gives exactly k units (`optimizer.target_size=k`).

The circuit shrinks as lambda grows. Each round trains `optimizer.target_lams` lambdas side by
side, evenly spaced in log lambda: first over `optimizer.target_range`, then inside the
bracket of the two neighbouring lambdas whose sizes straddle k. The search stops at the first
lambda whose rounded mask has k units, or after `optimizer.target_rounds` rounds; when every
lambda tried gives fewer (more) units, the next round looks a thousandfold below (above) them.
A size no lambda reached is reported with the nearest sizes found on either side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Trial = Tuple[float, int]  # (lambda, circuit size)


def log_grid(low: float, high: float, n: int) -> List[float]:
    """n lambdas from low to high, evenly spaced in log lambda."""
    step = (math.log(high) - math.log(low)) / (n - 1)
    return [float(f"{math.exp(math.log(low) + i * step):.6g}") for i in range(n)]


@dataclass
class LambdaSearch:
    """Every lambda tried for a target size, and what it gave."""

    target: int
    tried: List[Trial] = field(default_factory=list)

    @property
    def found(self) -> Optional[float]:
        """The first lambda tried whose circuit has exactly the target size."""
        return next((lam for lam, size in self.tried if size == self.target), None)

    def bracket(self) -> Tuple[Optional[Trial], Optional[Trial]]:
        """The largest lambda still giving more units than the target, and the next lambda above it
        giving fewer (the sizes on either side of the target)."""
        ordered = sorted(self.tried)
        more = [t for t in ordered if t[1] > self.target]
        below = more[-1] if more else None
        above = next((t for t in ordered if t[1] < self.target and (below is None or t[0] > below[0])), None)
        return below, above

    @property
    def chosen(self) -> float:
        """The lambda of the result: the one found, or else the one whose size is nearest the target."""
        if self.found is not None:
            return self.found
        return min(self.tried, key=lambda t: (abs(t[1] - self.target), -t[0]))[0]

    def record(self) -> Dict[str, Any]:
        below, above = self.bracket()
        return {
            "target_size": self.target,
            "reached": self.found is not None,
            "lam": self.chosen,
            "tried": [[lam, size] for lam, size in self.tried],
            "nearest_larger": list(below) if below else None,
            "nearest_smaller": list(above) if above else None,
        }

    def summary(self) -> str:
        if self.found is not None:
            return f"target size {self.target}: λ={self.found:g} gives it ({len(self.tried)} lambdas tried)"
        below, above = self.bracket()
        sides = [f"{size} units at λ={lam:g}" for lam, size in (t for t in (below, above) if t is not None)]
        if below is None:
            hint = (
                f"even λ={min(self.tried)[0]:g} patches fewer: the desiderata alone do not ask for {self.target} units"
            )
        elif above is None:
            hint = f"even λ={max(self.tried)[0]:g} patches more: raise optimizer.target_range's high end"
        else:
            hint = "the size jumps over it between those lambdas; raise optimizer.target_rounds to look closer"
        return (
            f"target size {self.target}: no lambda tried gives it; nearest: {', '.join(sides)}; {hint}; "
            f"the result is the nearest (λ={self.chosen:g})"
        )


def search_lambda(
    sizes_of: Callable[[Sequence[float]], List[int]],
    target: int,
    lam_range: Sequence[float],
    per_round: int,
    rounds: int,
) -> LambdaSearch:
    """Bisect over lambda for `target` units; `sizes_of(lams)` trains the lambdas side by side and
    returns each rounded circuit's size."""
    search = LambdaSearch(target)
    grid = log_grid(lam_range[0], lam_range[1], per_round)
    for _ in range(rounds):
        search.tried += list(zip(grid, sizes_of(grid)))
        if search.found is not None:
            break
        below, above = search.bracket()
        lams = [lam for lam, _ in search.tried]
        if below is None:  # every lambda tried gives fewer units: look below the range
            grid = log_grid(min(lams) / 1000, min(lams), per_round + 1)[:-1]
        elif above is None:  # every lambda tried gives more: look above it
            grid = log_grid(max(lams), max(lams) * 1000, per_round + 1)[1:]
        else:
            grid = log_grid(below[0], above[0], per_round + 2)[1:-1]
    return search
