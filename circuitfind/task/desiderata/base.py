"""The desideratum interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Type

import torch

from circuitfind.errors import CircuitfindError
from circuitfind.task.prompts import Problem, TaskSpace


class Desideratum(ABC):
    """How pairs are built, what the patched model should answer, and the loss."""

    name: str  # short, used in metric keys: <name>_test/acc
    title: str  # for figures and reports
    wants_alternate_answer: bool  # True: target is the alternate's answer; False: the base's

    @abstractmethod
    def alternates(self, base: Problem, space: TaskSpace) -> List[Problem]:
        """Candidate alternate prompts for `base`."""

    @abstractmethod
    def loss(self, delta: torch.Tensor) -> torch.Tensor:
        """Loss per mask from delta = d(patched) - d(unpatched), shape (K, B) -> (K,)."""


DESIDERATA: Dict[str, Type[Desideratum]] = {}


def register(cls: Type[Desideratum]) -> Type[Desideratum]:
    """Class decorator: make a desideratum available by its `name`."""
    DESIDERATA[cls.name] = cls
    return cls


def get_desideratum(name: str) -> Desideratum:
    if name not in DESIDERATA:
        raise CircuitfindError(f"unknown desideratum {name!r} in desiderata.terms; choose from {sorted(DESIDERATA)}")
    return DESIDERATA[name]()
