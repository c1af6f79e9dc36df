"""The (base, alternate) pairs of each desideratum: balanced splits, and the data of one run."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from circuitfind.errors import CircuitfindError
from circuitfind.task.desiderata import Desideratum, get_desideratum
from circuitfind.task.prompts import Problem, TaskSpace, first_digit, task_space, variants_from_config


@dataclass(frozen=True)
class Pair:
    """A base prompt and the alternate its components are patched from."""

    base: Problem
    alt: Problem


def balanced_counts(n: int, digits: Sequence[int] = range(1, 10)) -> Dict[int, int]:
    """n split as evenly as possible over the answer's first digit 1..9."""
    digits = list(digits)
    return {d: n // len(digits) + (1 if i < n % len(digits) else 0) for i, d in enumerate(digits)}


def make_pairs(
    alternates: Callable[[Problem, TaskSpace], List[Problem]],
    space: TaskSpace,
    ops: Sequence[str],
    sizes: Sequence[int],
    rng: random.Random,
    label: str,
    names: Sequence[str] = (),
) -> List[List[Pair]]:
    """Draw disjoint splits of pairs, each balanced over the base answer's first digit.

    `alternates(base, space)` lists the candidate alternates of a base; a pair is kept only
    when the alternate's answer is non-negative and starts with another digit (otherwise the
    logit difference of the pair is identically zero and it carries no signal). `names` are the
    config keys of the sizes, for the error that says how large the first one can be.
    """
    by_digit: Dict[int, List[Problem]] = defaultdict(list)
    for base in space.bases(ops):
        if base.answer > 0:
            by_digit[first_digit(base.answer)].append(base)
    needed = defaultdict(int)
    for n in sizes:
        for d, c in balanced_counts(n).items():
            needed[d] += c
    drawn: Dict[int, List[Pair]] = {}
    for d in range(1, 10):
        bases = by_digit[d][:]
        rng.shuffle(bases)
        pairs = []
        for base in bases:
            if len(pairs) == needed[d]:
                break
            base = space.variants.apply(base, rng)
            valid = [a for a in alternates(base, space) if a.answer >= 0 and first_digit(a.answer) != d]
            if valid:
                pairs.append(Pair(base, rng.choice(valid)))
        if len(pairs) < needed[d]:
            largest = ""
            if names:
                most = largest_first_size(available_by_digit(alternates, space, by_digit), sizes[1:])
                others = ", ".join(f"{k}={n}" for k, n in zip(names[1:], sizes[1:]))
                largest = f"; {names[0]} can be at most {most}" + (f" with {others}" if others else "")
            raise CircuitfindError(
                f"{label}: only {len(pairs)} pairs whose answer starts with {d} can be made from "
                f"operations {list(ops)} in their dataset.ranges, but {needed[d]} are needed{largest}; "
                "widen dataset.ranges or lower dataset.n_train / n_test / n_transfer"
            )
        drawn[d] = pairs
    splits = []
    offset = defaultdict(int)
    for n in sizes:
        split = []
        for d, c in balanced_counts(n).items():
            split += drawn[d][offset[d] : offset[d] + c]
            offset[d] += c
        rng.shuffle(split)
        splits.append(split)
    return splits


def available_by_digit(alternates, space: TaskSpace, by_digit: Dict[int, List[Problem]]) -> Dict[int, int]:
    """How many bases of each answer digit have at least one usable alternate (prompt forms aside)."""
    return {
        d: sum(
            any(a.answer >= 0 and first_digit(a.answer) != d for a in alternates(base, space)) for base in by_digit[d]
        )
        for d in range(1, 10)
    }


def largest_first_size(available: Dict[int, int], other_sizes: Sequence[int]) -> int:
    """The largest first split that still fits, balanced, beside the other splits."""

    def fits(n: int) -> bool:
        needed = defaultdict(int)
        for size in (n, *other_sizes):
            for d, c in balanced_counts(size).items():
                needed[d] += c
        return all(needed[d] <= available[d] for d in range(1, 10))

    low, high = 0, 9 * max(available.values(), default=0) + 9
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


def build_data(dataset, desiderata: Sequence[str], seed: int) -> Dict[str, DesideratumData]:
    """Train, held-out and transfer pairs of each named desideratum, from the `dataset` config."""
    d = dataset
    space = task_space(
        d.ranges,
        list(d.train_ops) + list(d.transfer_ops),
        alt_ops=list(d.train_ops),
        variants=variants_from_config(d.variants),
    )
    data = {}
    for name in desiderata:
        des = get_desideratum(name)
        rng = random.Random(f"{seed}/{name}")  # independent of which other desiderata run
        names = ("dataset.n_train", "dataset.n_test")
        train, test = make_pairs(des.alternates, space, d.train_ops, [d.n_train, d.n_test], rng, f"{name} pairs", names)
        transfer: List[Pair] = []
        if d.transfer_ops and d.n_transfer:
            (transfer,) = make_pairs(
                des.alternates,
                space,
                d.transfer_ops,
                [d.n_transfer],
                rng,
                f"{name} transfer pairs",
                ["dataset.n_transfer"],
            )
        data[name] = DesideratumData(des, train, test, transfer)
    return data


def data_fingerprint(data: Dict[str, DesideratumData], template: str) -> str:
    """A short hash of every prompt pair, so two runs can be checked to share data."""
    blob = json.dumps(
        {n: [[repr(p) for p in split] for split in (v.train, v.test, v.transfer)] for n, v in data.items()}
        | {"template": template}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
