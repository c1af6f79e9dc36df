"""Arithmetic variable-binding prompts: operations, problems, prompt variants and the task space."""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from circuitfind.errors import CircuitfindError


@dataclass(frozen=True)
class Operation:
    """A binary operation as it appears in a prompt."""

    name: str
    symbol: str
    apply: Callable[[int, int], int]
    query: str = "{a} {symbol} {b} = "  # the last line of the prompt; {a}, {b} are the names

    @property
    def infix(self) -> bool:
        """Written `x {op} y = `, so that the dataset template can render it."""
        return self.query == Operation.query


OPERATIONS: Dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("add", "+", operator.add),
        Operation("sub", "-", operator.sub),
        Operation("mul", "*", operator.mul),
        # Pure retrieval, `x = 3\ny = 5\nx = `: the binding alone, no arithmetic.
        Operation("get", "", lambda x, y: x, query="{a} = "),
    )
}


@dataclass(frozen=True)
class Problem:
    """One prompt: two variable definitions and the query `x {op} y = `.

    The canonical form (names x and y, x defined first, no distractor) is rendered through
    the configured template. Variants, which stop binding from being purely positional,
    are rendered as definition lines `name = value` followed by the query line.
    """

    x: int
    y: int
    op: str  # a key of OPERATIONS
    names: tuple[str, str] = ("x", "y")  # the names bound to the first and second operand
    y_first: bool = False  # define the second operand before the first
    distractor: Optional[tuple[str, int, int]] = None  # (name, value, line): a definition to ignore

    @property
    def answer(self) -> int:
        return OPERATIONS[self.op].apply(self.x, self.y)

    @property
    def canonical(self) -> bool:
        return self.names == ("x", "y") and not self.y_first and self.distractor is None

    def render(self, template: str) -> str:
        op = OPERATIONS[self.op]
        if self.canonical and op.infix:
            return template.format(x=self.x, y=self.y, op=op.symbol)
        (a, b), defs = self.names, [f"{self.names[0]} = {self.x}", f"{self.names[1]} = {self.y}"]
        if self.y_first:
            defs.reverse()
        if self.distractor is not None:
            name, value, line = self.distractor
            defs.insert(line, f"{name} = {value}")
        return "\n".join(defs) + "\n" + op.query.format(a=a, b=b, symbol=op.symbol)


@dataclass(frozen=True)
class Variants:
    """How often prompts leave the canonical form (all zero: the paper's prompts only)."""

    names: Sequence[tuple[str, str]] = (("x", "y"),)  # name pairs, drawn uniformly
    y_first: float = 0.0  # probability of defining the second operand first
    distractor: float = 0.0  # probability of an extra definition
    distractor_names: Sequence[str] = ("z",)
    distractor_values: range = range(10, 100)

    def apply(self, problem: Problem, rng: random.Random) -> Problem:
        """`problem` in a randomly drawn variant (always canonical when all are off)."""
        names = tuple(rng.choice(list(self.names)))
        y_first = rng.random() < self.y_first
        distractor = None
        if rng.random() < self.distractor:
            free = [n for n in self.distractor_names if n not in names]
            if free:
                distractor = (rng.choice(free), rng.choice(self.distractor_values), rng.randint(0, 2))
        return replace(problem, names=names, y_first=y_first, distractor=distractor)


@dataclass(frozen=True)
class TaskSpace:
    """The operations and operand ranges prompts are drawn from."""

    ranges: Mapping[str, tuple[range, range]]  # op -> (x values, y values)
    alt_ops: Sequence[str]  # operations an alternate may switch to (OI)
    variants: Variants = Variants()

    def bases(self, ops: Sequence[str]) -> List[Problem]:
        """Every problem with a non-negative answer, in a fixed order."""
        return [
            Problem(x, y, op)
            for op in ops
            for x in self.ranges[op][0]
            for y in self.ranges[op][1]
            if Problem(x, y, op).answer >= 0
        ]


def variants_from_config(cfg: Mapping) -> Variants:
    """Check `dataset.variants` and turn it into a `Variants`."""
    for key in ("y_first", "distractor"):
        if not 0 <= cfg[key] <= 1:
            raise CircuitfindError(f"dataset.variants.{key}={cfg[key]} is a probability; give a value in [0, 1]")
    names = [tuple(pair) for pair in cfg["names"]]
    if not names or any(len(p) != 2 or p[0] == p[1] or not all(str(n).isalpha() for n in p) for p in names):
        raise CircuitfindError(
            f"dataset.variants.names={cfg['names']} must list pairs of two different alphabetic names, e.g. [[x, y], [a, b]]"
        )
    return Variants(
        names=names,
        y_first=cfg["y_first"],
        distractor=cfg["distractor"],
        distractor_names=list(cfg["distractor_names"]),
    )


def first_digit(n: int) -> int:
    return int(str(n)[0])


def check_template(template: str) -> None:
    """Fail early on a template that cannot express the task."""
    for slot in ("{x}", "{y}", "{op}"):
        if slot not in template:
            raise CircuitfindError(
                f"dataset.template {template!r} has no {slot}; "
                "it needs {x}, {y} and {op}, e.g. 'x = {x}\\ny = {y}\\nx {op} y = '"
            )


def task_space(
    ranges_cfg: Mapping, ops: Sequence[str], alt_ops: Sequence[str], variants: Variants = Variants()
) -> TaskSpace:
    """Build the task space from `dataset.ranges`, checking every operation is known."""
    ranges = {}
    for op in list(ops) + list(alt_ops):
        if op not in OPERATIONS:
            raise CircuitfindError(
                f"unknown operation {op!r}; choose from {sorted(OPERATIONS)} "
                "in dataset.train_ops / dataset.transfer_ops"
            )
        if op not in ranges_cfg:
            raise CircuitfindError(f"dataset.ranges has no entry for operation {op!r}; add dataset.ranges.{op}")
        r = ranges_cfg[op]
        (x_lo, x_hi), (y_lo, y_hi) = r["x"], r["y"]
        if x_lo > x_hi or y_lo > y_hi or x_lo < 0 or y_lo < 0:
            raise CircuitfindError(
                f"dataset.ranges.{op} = x {[x_lo, x_hi]}, y {[y_lo, y_hi]} is empty or negative; "
                "give [low, high] with 0 <= low <= high"
            )
        ranges[op] = (range(x_lo, x_hi + 1), range(y_lo, y_hi + 1))
    return TaskSpace(ranges=ranges, alt_ops=list(alt_ops), variants=variants)
