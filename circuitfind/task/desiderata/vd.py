"""Value Dependence: patching the circuit from a prompt with another x moves the answer."""

from __future__ import annotations

from dataclasses import replace
from typing import List

import torch

from circuitfind.task.desiderata.base import Desideratum, register
from circuitfind.task.prompts import Problem, TaskSpace


@register
class ValueDependence(Desideratum):
    name = "vd"
    title = "Value Dependence"
    wants_alternate_answer = True

    def alternates(self, base: Problem, space: TaskSpace) -> List[Problem]:
        xs = space.ranges[base.op][0]
        return [replace(base, x=x) for x in xs if x != base.x]

    def loss(self, delta: torch.Tensor) -> torch.Tensor:
        # Push the logit difference towards the alternate's answer.
        return -delta.mean(dim=-1)
