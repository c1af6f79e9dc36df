"""The (base, alternate) pairs of each desideratum: balanced splits, and the data of one run."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Set, Tuple

from circuitfind.errors import CircuitfindError
from circuitfind.task.desiderata import Desideratum
from circuitfind.task.spec import Problem, Prompt, TaskSpec


@dataclass(frozen=True)
class Pair:
    """A base prompt and the alternate its components are patched from (written in the same form)."""

    base: Prompt
    alt: Prompt


def balanced_counts(n: int, keys: Sequence[str]) -> Dict[str, int]:
    """n split as evenly as possible over the balance keys, the first keys taking the remainder."""
    keys = list(keys)
    return {k: n // len(keys) + (1 if i < n % len(keys) else 0) for i, k in enumerate(keys)}


def make_pairs(
    task: TaskSpec,
    des: Desideratum,
    split: str,
    sizes: Sequence[int],
    rng: random.Random,
    names: Sequence[str] = (),
    exclude: Set[Tuple] = frozenset(),
) -> List[List[Pair]]:
    """Draw disjoint lists of pairs from `split`'s problems, each balanced over the answer's key.

    Bases are shuffled per key; each gets a form, then an alternate drawn among its usable
    ones (a base with none is skipped). `names` are the config keys of the sizes, for the
    error that says how large the first one can be; problems whose values are in `exclude` are
    never a base.
    """
    every = task.problems(split)
    if not every and any(sizes):
        raise CircuitfindError(
            f"task {task.name}: no problem of the {split} split satisfies the constraints "
            f"{[c.text for c in task.constraints] or '(none)'}; loosen task.constraints or widen the {split} slot domains"
        )
    problems = [p for p in every if p.values not in exclude]
    keys = task.keys(problems)
    by_key: Dict[str, List[Problem]] = defaultdict(list)
    for p in problems:
        by_key[p.key].append(p)
    needed: Dict[str, int] = defaultdict(int)
    for n in sizes:
        for k, c in balanced_counts(n, keys).items():
            needed[k] += c
    drawn: Dict[str, List[Pair]] = {}
    for key in keys:
        bases = by_key[key][:]
        rng.shuffle(bases)
        pairs: List[Pair] = []
        for base in bases:
            if len(pairs) == needed[key]:
                break
            form = task.draw_form(rng)
            valid = des.alternates(task, base, split)
            if valid:
                pairs.append(Pair(task.render(base, form), task.render(rng.choice(valid), form)))
        if len(pairs) < needed[key]:
            available = {k: sum(bool(des.alternates(task, b, split)) for b in by_key[k]) for k in keys}
            label = f"{des.name} {split} pairs"
            where = f"the {split} slot domains and constraints of task {task.name}"
            raise CircuitfindError(
                too_few(label, where, key, len(pairs), needed[key], available, list(zip(names, sizes)))
            )
        drawn[key] = pairs
    splits, offset = [], defaultdict(int)
    for n in sizes:
        split_pairs = []
        for k, c in balanced_counts(n, keys).items():
            split_pairs += drawn[k][offset[k] : offset[k] + c]
            offset[k] += c
        rng.shuffle(split_pairs)
        splits.append(split_pairs)
    return splits


def too_few(label, where, key, found, needed, available: Dict[str, int], requested) -> str:
    """The error for a split that cannot be filled: how many pairs exist, and the largest first
    size that fits. `requested` is [(config key, size)] of every split drawn together."""
    largest = ""
    if requested:
        (first, _), others = requested[0], requested[1:]
        most = largest_first_size(available, list(available), [n for _, n in others])
        beside = ", ".join(f"{k}={n}" for k, n in others)
        largest = f"; {first} can be at most {most}" + (f" with {beside}" if beside else "")
    return (
        f"{label}: only {found} pairs whose answer has key {key!r} can be made from {where} "
        f"({sum(available.values())} usable bases in all), but {needed} are needed{largest}; "
        "widen the task's slot domains or lower task.n_train / n_test / n_transfer"
    )


def largest_first_size(available: Dict[str, int], keys: Sequence[str], other_sizes: Sequence[int]) -> int:
    """The largest first split that still fits, balanced, beside the other splits."""

    def fits(n: int) -> bool:
        needed: Dict[str, int] = defaultdict(int)
        for size in (n, *other_sizes):
            for k, c in balanced_counts(size, keys).items():
                needed[k] += c
        return all(needed[k] <= available[k] for k in keys)

    low, high = 0, len(keys) * max(available.values(), default=0) + len(keys)
    while low < high:  # the largest n with fits(n); fits is monotone in n
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


@dataclass
class DesideratumData:
    """Every split of one desideratum's pairs."""

    desideratum: Desideratum
    train: List[Pair]
    test: List[Pair]
    transfer: List[Pair]
    validation: List[Pair] = field(default_factory=list)  # drawn like train, no base shared with train or test

    def splits(self) -> Dict[str, List[Pair]]:
        """Every split that has pairs, by name."""
        every = {"train": self.train, "test": self.test, "transfer": self.transfer, "validation": self.validation}
        return {name: pairs for name, pairs in every.items() if pairs}


def build_data(
    task: TaskSpec, sizes, desiderata: Sequence[Desideratum], seed: int, n_validation: int = 0
) -> Dict[str, DesideratumData]:
    """Train, held-out and transfer pairs of each desideratum (`sizes` has n_train, n_test, n_transfer),
    and `n_validation` validation pairs from the train problems that no train or test pair is based on.

    The validation split has its own random stream, so asking for it changes no other split."""
    data = {}
    for des in desiderata:
        rng = random.Random(f"{seed}/{des.name}")  # independent of which other desiderata run
        train, test = make_pairs(
            task, des, "train", [sizes.n_train, sizes.n_test], rng, ("task.n_train", "task.n_test")
        )
        transfer: List[Pair] = []
        if task.has_transfer and sizes.n_transfer:
            (transfer,) = make_pairs(task, des, "transfer", [sizes.n_transfer], rng, ["task.n_transfer"])
        validation: List[Pair] = []
        if n_validation:
            used = {pair.base.problem.values for pair in train + test}
            (validation,) = make_pairs(
                task, des, "train", [n_validation], random.Random(f"{seed}/{des.name}/validation"),
                ["task.n_validation"], exclude=used,
            )  # fmt: skip
        data[des.name] = DesideratumData(des, train, test, transfer, validation)
    return data


def data_fingerprint(data: Dict[str, DesideratumData]) -> str:
    """A short hash of every prompt pair's texts and answers, so two runs can be checked to share data."""
    blob = json.dumps(
        {
            name: [
                [[p.base.text, p.base.answer_text, p.alt.text, p.alt.answer_text] for p in split]
                for split in (v.train, v.test, v.transfer) + ((v.validation,) if v.validation else ())
            ]
            for name, v in data.items()
        }
    )  # a run without a validation split keeps the fingerprint it had before there was one
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
