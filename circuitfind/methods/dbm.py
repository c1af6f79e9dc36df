"""The mask-training loop of desiderata-based masking, top to bottom (docs/method.md).

Each iteration, for each desideratum in order: bring the gate parameters into their domain
(the paper's gate: clamp w to [0, 1]), one Adam step on weight * loss (+ lambda * sparsity on the
steps that carry it). After training: the gate's final weights, rounded at 0.5. The gate form
(methods/gates.py) decides how parameters become weights and what sparsity costs. K masks (one
per lambda) are trained side by side; Adam is element-wise and each mask's loss touches only its
own parameters, so this equals K separate runs.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.methods.gates import ClampGate, make_gate
from circuitfind.methods.objective import Objective, loss_parts
from circuitfind.model.engine import Engine
from circuitfind.progress import progress as progress_of

OnStep = Callable[[int, torch.Tensor, Dict[str, torch.Tensor]], None]  # (step, masks (K, L, H+1), logs)


def sparsity(mask: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's l0.5 penalty per mask: sum_i (1 + eps - w_i) ** 0.5. (K, L, H+1) -> (K,)"""
    return ClampGate(eps).penalty(mask, 0.0)


class NonFiniteLoss(CircuitfindError):
    """The loss became NaN or inf; `last_good` holds the mask before the failing step."""

    def __init__(self, message: str, last_good: torch.Tensor):
        super().__init__(message)
        self.last_good = last_good


def train_mask(
    engine: Engine,
    objectives: Sequence[Objective],
    lams: torch.Tensor,
    optimizer,
    on_step: OnStep | None = None,
    progress: bool = True,
    desc: str = "mask",
    seed: int = 0,
) -> torch.Tensor:
    """Learn K continuous masks (w = 1: keep, w = 0: patch), one per lambda. Returns (K, L, H+1) in [0, 1].

    `optimizer` is the optimizer config (lr, steps, gate and its settings; methods/gates.py);
    `desc` labels the progress bar; `seed` draws a sampled gate's noise.
    """
    gate = make_gate(optimizer, seed)
    k, steps = lams.shape[0], optimizer.steps
    params = gate.init(k, engine.space.shape, lams.device).requires_grad_(True)
    opt = torch.optim.Adam([params], lr=optimizer.lr)
    with progress_of(steps, desc, progress) as advance:
        for step in range(steps):
            logs: Dict[str, torch.Tensor] = {}
            done = step / max(steps - 1, 1)  # how far training has gone, 0 to 1 (temperature schedules)
            for obj in objectives:
                one_step(engine, obj, gate, params, opt, lams, done, step, logs)
            with torch.no_grad():
                gate.project(params)
                mask = gate.final(params)
                logs["n_patched"] = (mask < 0.5).flatten(1).sum(dim=1).float()
            if on_step is not None:
                on_step(step, mask, logs)
            advance(1)
    return gate.final(params)


def one_step(engine, obj: Objective, gate, params, opt, lams, done: float, step: int, logs) -> None:
    """One Adam step of one desideratum's term (with lambda * sparsity when the term carries it)."""
    with torch.no_grad():
        gate.project(params)
    last_good = gate.final(params)
    opt.zero_grad(set_to_none=True)
    # One draw of the weights per step, whatever the sub-batches: their gradients gather on a
    # detached copy, then flow back through the gate once.
    weights = gate.weights(params, done)
    mask = weights.detach().requires_grad_(True)
    loss_sum = torch.zeros(params.shape[0], device=params.device)
    for part in loss_parts(engine, obj, mask):
        (obj.weight * part).sum().backward()
        loss_sum = loss_sum + part.detach()
    weights.backward(mask.grad)
    loss = obj.weight * loss_sum
    if obj.with_sparsity:
        penalty = lams * gate.penalty(params, done)
        penalty.sum().backward()
        logs["sparsity"] = penalty.detach()
        loss = loss + penalty.detach()
    if not (torch.isfinite(loss).all() and torch.isfinite(params.grad).all()):
        raise NonFiniteLoss(
            f"the {obj.desideratum.name} loss or its gradient became non-finite at step {step}; "
            "the last good mask is kept; lower optimizer.lr or check the model's dtype",
            last_good,
        )
    logs[f"{obj.desideratum.name}_loss"] = loss_sum
    opt.step()


def round_mask(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask: 1 keeps a component, 0 patches it (w < 0.5)."""
    return (mask >= 0.5).to(mask.dtype)
