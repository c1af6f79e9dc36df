"""Gate forms: how DBM's trained parameters become mask weights w in [0, 1] (1 = keep, 0 = patch),
and what the sparsity term charges for patching (`optimizer.gate`).

clamp          the paper's: w itself is trained, clamped to [0, 1] before every step, and the
               l0.5 penalty sum (1 + eps - w) ** 0.5 is charged; rounded at 0.5
sigmoid        w = sigmoid(m / T): logits m start at `init_logit`, the temperature T falls
               geometrically from `temperature[0]` to `temperature[1]` over the steps, so the
               gates end nearly binary; the penalty is the l1 sum (1 - w) of what is patched
hard_concrete  Louizos et al.'s stretched hard-concrete gate on what is patched, z = 1 - w,
               sampled during training (the noise breaks ties between units that back each other
               up) and its mean at the end; the penalty is the expected number of patched units (L0)

Every gate gives K masks side by side, one per lambda: its parameters are (K, L, n_cols).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Gate(Protocol):
    """What the training loop asks of a gate form."""

    def init(self, k: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The trainable parameters of K masks, before the first step. (K, L, n_cols)"""

    def weights(self, params: torch.Tensor, progress: float) -> torch.Tensor:
        """The mask weights a training step uses; `progress` runs from 0 to 1 over the steps."""

    def penalty(self, params: torch.Tensor, progress: float) -> torch.Tensor:
        """The sparsity term per mask, before lambda. (K, L, n_cols) -> (K,)"""

    def project(self, params: torch.Tensor) -> None:
        """Bring the parameters back into their domain, in place (before each step and at the end)."""

    def final(self, params: torch.Tensor) -> torch.Tensor:
        """The trained weights, deterministic, in [0, 1]. (K, L, n_cols)"""


@dataclass(frozen=True)
class ClampGate:
    """The paper's update: w trained directly, clamped to [0, 1], l0.5 penalty."""

    eps: float = 1e-3  # the 1.001 of the penalty: its gradient at w = 1 is finite

    def init(self, k, shape, device):
        return torch.ones(k, *shape, device=device)

    def weights(self, params, progress):
        return params

    def penalty(self, params, progress):
        return ((1 + self.eps - params) ** 0.5).flatten(1).sum(dim=1)

    def project(self, params):
        params.clamp_(0, 1)

    def final(self, params):
        return params.detach().clamp(0, 1)


@dataclass(frozen=True)
class SigmoidGate:
    """w = sigmoid(m / T), T annealed geometrically; l1 penalty on 1 - w."""

    init_logit: float = 3.0
    temperature: tuple[float, float] = (1.0, 0.05)

    def temperature_at(self, progress: float) -> float:
        start, end = self.temperature
        return start * (end / start) ** progress

    def init(self, k, shape, device):
        return torch.full((k, *shape), self.init_logit, device=device)

    def weights(self, params, progress):
        return torch.sigmoid(params / self.temperature_at(progress))

    def penalty(self, params, progress):
        return (1 - self.weights(params, progress)).flatten(1).sum(dim=1)

    def project(self, params):
        pass

    def final(self, params):
        return self.weights(params.detach(), 1.0)


@dataclass
class HardConcreteGate:
    """Stretched hard-concrete gates on the patched amount z = 1 - w (Louizos, Welling and Kingma, 2018)."""

    init_log_alpha: float = -2.0
    beta: float = 2 / 3
    limits: tuple[float, float] = (-0.1, 1.1)  # the stretch (gamma, zeta): z reaches 0 and 1 exactly
    seed: int = 0

    def __post_init__(self):
        self.generator: torch.Generator | None = None

    def init(self, k, shape, device):
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.full((k, *shape), self.init_log_alpha, device=device)

    def stretch(self, s: torch.Tensor) -> torch.Tensor:
        low, high = self.limits
        return (s * (high - low) + low).clamp(0, 1)

    def weights(self, params, progress):
        u = torch.rand(params.shape, generator=self.generator, device=params.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + params) / self.beta)
        return 1 - self.stretch(s)

    def penalty(self, params, progress):
        low, high = self.limits
        return torch.sigmoid(params - self.beta * math.log(-low / high)).flatten(1).sum(dim=1)

    def project(self, params):
        pass

    def final(self, params):
        return 1 - self.stretch(torch.sigmoid(params.detach()))


GATE_CLASSES = {"clamp": ClampGate, "sigmoid": SigmoidGate, "hard_concrete": HardConcreteGate}  # config.choices.GATES


def make_gate(optimizer, seed: int = 0) -> Gate:
    """The gate form the optimizer config names, with its settings."""
    name = optimizer.gate
    if name == "clamp":
        return ClampGate(eps=optimizer.eps)
    if name == "sigmoid":
        start, end = optimizer.temperature
        return SigmoidGate(temperature=(float(start), float(end)))
    if name == "hard_concrete":
        return HardConcreteGate(seed=seed)
    raise ValueError(f"optimizer.gate={name!r} has no implementation")
