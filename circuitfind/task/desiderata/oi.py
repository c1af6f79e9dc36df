"""Operation Invariance: patching the circuit from a prompt with another operation changes nothing."""

from __future__ import annotations

from dataclasses import replace
from typing import List

import torch

from circuitfind.task.desiderata.base import Desideratum, register
from circuitfind.task.prompts import Problem, TaskSpace


@register
class OperationInvariance(Desideratum):
    name = "oi"
    title = "Operation Invariance"
    wants_alternate_answer = False

    def alternates(self, base: Problem, space: TaskSpace) -> List[Problem]:
        return [replace(base, op=op) for op in space.alt_ops if op != base.op]

    def loss(self, delta: torch.Tensor) -> torch.Tensor:
        # Keep the logit difference where the unpatched model had it.
        return (delta**2).mean(dim=-1)
