"""A task from its YAML: slots and their domains, the answer, constraints, prompt forms, balance.

A *problem* is one value per enumerated slot (every combination that satisfies the
constraints is a problem); a *form* is how its prompt is written (variable names, line
order, a distractor line), drawn at random per prompt and shared by a base and its
alternate; a *prompt* is a problem rendered in a form, with its answer text.
"""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from circuitfind.errors import CircuitfindError
from circuitfind.task.expressions import Expression
from circuitfind.task.forms import Form, Line, Variant

SPLITS = ("train", "transfer")  # test pairs are drawn from the train split's problems
BALANCES = ("first_char", "answer", "none")


class Problem:
    """One value per enumerated slot, with what they give: derived slots and the answer.

    A plain class with slots, not a dataclass: a task may enumerate hundreds of thousands."""

    __slots__ = ("values", "env", "key")

    def __init__(self, values: Tuple[Any, ...], env: Mapping[str, Any], key: str):
        self.values = values  # in the task's slot order
        self.env = env  # every slot's value, and `answer`
        self.key = key  # the balance key of the answer

    @property
    def answer(self) -> Any:
        return self.env["answer"]

    def __getitem__(self, slot: str) -> Any:
        return self.env[slot]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and self.values == other.values

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        return f"Problem({dict(self.env)})"


@dataclass(frozen=True)
class Prompt:
    """A problem written in a form: the text the model reads and the answer it should give."""

    problem: Problem
    form: Form
    text: str
    answer_text: str  # the answer as the model should continue the text (answer_prefix included)

    def __getitem__(self, slot: str) -> Any:
        return self.problem[slot]


def domain_of(slot: Mapping, where: str) -> List[Any]:
    """The values of a slot config: an inclusive integer range or a list."""
    given = [k for k in ("range", "values", "expr") if slot.get(k) is not None]
    if len(given) != 1:
        raise CircuitfindError(
            f"{where} needs exactly one of range: [low, high], values: [...] or expr: '...'; it has {given or 'none'}"
        )
    if slot.get("values") is not None:
        values = list(slot["values"])
        if not values:
            raise CircuitfindError(f"{where}.values is empty; list at least one value")
        if len(set(map(str, values))) != len(values):
            raise CircuitfindError(f"{where}.values={values} repeats a value")
        return values
    if slot.get("range") is not None:
        r = list(slot["range"])
        if len(r) != 2 or not all(isinstance(v, int) for v in r) or r[0] > r[1]:
            raise CircuitfindError(f"{where}.range={r} is empty or not two integers; give [low, high] with low <= high")
        return list(range(r[0], r[1] + 1))
    return []


class TaskSpec:
    """A task config checked and compiled: enumerates problems, draws forms, renders prompts."""

    def __init__(self, cfg: Mapping):
        self.name = str(cfg["name"])
        self.title = str(cfg.get("title") or self.name)
        self.template = str(cfg["template"])
        self.answer_prefix = str(cfg.get("answer_prefix") or "")
        self.tables = {k: dict(v) for k, v in (cfg.get("tables") or {}).items()}
        slots = dict(cfg["slots"] or {})
        if not slots:
            raise CircuitfindError("task.slots is empty; give each slot of the template a domain")
        self.enumerated = [s for s, c in slots.items() if c.get("expr") is None]
        self.domains: Dict[str, Dict[str, List[Any]]] = {"train": {}, "transfer": {}}
        for s in self.enumerated:
            self.domains["train"][s] = domain_of(slots[s], f"task.slots.{s}")
        transfer = dict(cfg.get("transfer") or {})
        for s, c in transfer.items():
            if s not in self.enumerated:
                raise CircuitfindError(f"task.transfer.{s} is not an enumerated slot; choose from {self.enumerated}")
            self.domains["transfer"][s] = domain_of(c, f"task.transfer.{s}")
        self.has_transfer = bool(transfer)
        self.domains["transfer"] = {s: self.domains["transfer"].get(s, d) for s, d in self.domains["train"].items()}
        self.one_token = [s for s, c in slots.items() if c.get("one_token")]
        names = set(slots)
        self.derived = [
            (s, Expression(c["expr"], names, self.tables, f"task.slots.{s}.expr"))
            for s, c in slots.items()
            if c.get("expr") is not None
        ]
        self.answer = Expression(cfg["answer"], names, self.tables, "task.answer")
        self.constraints = [
            Expression(c, names | {"answer"}, self.tables, "task.constraints") for c in cfg.get("constraints") or []
        ]
        lines = self.template.split("\n")
        self.variants: List[Variant] = []
        for n, v in (cfg.get("variants") or {}).items():
            own = {x: domain_of(c, f"task.variants.{n}.slots.{x}") for x, c in (v.get("slots") or {}).items()}
            earlier = {x for w in self.variants for x in w.bound}
            self.variants.append(Variant(n, v, own, len(lines), self.tables, earlier))
        self.balance = str(cfg.get("balance") or "first_char")
        if self.balance not in BALANCES:
            raise CircuitfindError(f"task.balance={self.balance!r} is unknown; choose from {list(BALANCES)}")
        keys = cfg.get("balance_keys")
        self.balance_keys = [str(k) for k in keys] if keys is not None else None
        self._check_templates(names)
        self._problems: Dict[Tuple[Any, ...], Optional[Problem]] = {}
        self._varied: Dict[tuple, List[Tuple[tuple, Problem]]] = {}
        self._split_problems: Dict[str, List[Problem]] = {}

    def _check_templates(self, names: set) -> None:
        """Every `{slot}` of every template has a domain or is given by a variant."""
        bound = {s for v in self.variants for s in v.bound}
        templates = [("task.template", self.template)]
        templates += [(f"task.variants.{v.name}.templates", t) for v in self.variants for t in v.templates]
        templates += [(f"task.variants.{v.name}.insert", v.insert) for v in self.variants if v.insert]
        for where, template in templates:
            for _, slot, spec, conversion in string.Formatter().parse(template):
                if slot is None:
                    continue
                if spec or conversion:
                    raise CircuitfindError(
                        f"{where}: {{{slot}}} has a format ({spec or conversion!r}); write plain {{{slot}}}"
                    )
                if slot not in names | bound:
                    raise CircuitfindError(
                        f"{where} uses {{{slot}}}, which has no domain; add task.slots.{slot} "
                        f"(range: [low, high], values: [...] or expr: '...') or bind it in a variant"
                    )

    # Problems ------------------------------------------------------------------------------

    def problem(self, values: Tuple[Any, ...]) -> Optional[Problem]:
        """The problem of these slot values, or None when a constraint rules it out (memoised)."""
        if values not in self._problems:
            env = dict(zip(self.enumerated, values))
            for slot, expr in self.derived:
                env[slot] = expr(env)
            env["answer"] = self.answer(env)
            ok = True
            for constraint in self.constraints:
                if not constraint(env):
                    ok = False
                    break
            self._problems[values] = Problem(values, env, self.key(env["answer"])) if ok else None
        return self._problems[values]

    def problems(self, split: str) -> List[Problem]:
        """Every problem of a split, in the order of the slots' domains (memoised)."""
        if split not in self._split_problems:
            domains = [self.domains[split][s] for s in self.enumerated]
            found = [p for values in itertools.product(*domains) if (p := self.problem(values)) is not None]
            self._split_problems[split] = found
        return self._split_problems[split]

    def key(self, answer: Any) -> str:
        """What splits are balanced over: the answer's first character, the answer, or nothing."""
        text = str(answer).strip()
        return {"first_char": text[:1], "answer": text, "none": ""}[self.balance]

    def keys(self, problems: Sequence[Problem]) -> List[str]:
        """The balance keys, in order: as configured, or every key the problems have."""
        return self.balance_keys if self.balance_keys is not None else sorted({p.key for p in problems})

    def varied(self, base: Problem, slots: Sequence[str], split: str, new_key: bool = False) -> List[Problem]:
        """Problems that differ from `base` in the given slots (over `split`'s domains), the rest kept;
        with new_key, only those whose answer has another balance key (with balance: none, another answer).

        Memoised on the kept values: bases that share them share their candidates."""
        index = [self.enumerated.index(s) for s in slots]
        kept = tuple(v for i, v in enumerate(base.values) if i not in index)
        key = (kept, tuple(slots), split)
        if key not in self._varied:
            candidates = []
            for combo in itertools.product(*(self.domains[split][s] for s in slots)):
                values = list(base.values)
                for i, v in zip(index, combo):
                    values[i] = v
                if (p := self.problem(tuple(values))) is not None:
                    candidates.append((combo, p))
            self._varied[key] = candidates
        own = tuple(base.values[i] for i in index)
        if not new_key:
            return [p for combo, p in self._varied[key] if combo != own]
        if self.balance == "none":  # every key is "": another answer is what tells them apart
            return [p for combo, p in self._varied[key] if combo != own and str(p.answer) != str(base.answer)]
        return [p for combo, p in self._varied[key] if combo != own and p.key != base.key]

    # Prompts -------------------------------------------------------------------------------

    def draw_form(self, rng: random.Random) -> Form:
        texts: Dict[str, str] = {}
        edits: list = []
        template = self.template
        for variant in self.variants:
            template = variant.draw(rng, texts, edits, template)
        return Form(template, tuple(texts.items()), tuple(edits))

    def render(self, problem: Problem, form: Form) -> Prompt:
        text = "\n".join(line for line, _ in self._lines(problem, form))
        return Prompt(problem, form, text, self.answer_prefix + str(problem.answer))

    def spans(self, prompt: Prompt) -> List[Tuple[str, int, int]]:
        """(slot, start, end) character spans of every slot value written in the prompt's text."""
        out, offset = [], 0
        for line, spans in self._lines(prompt.problem, prompt.form):
            out += [(slot, offset + start, offset + end) for slot, start, end in spans]
            offset += len(line) + 1
        return out

    def _lines(self, problem: Problem, form: Form) -> List[Line]:
        return form.lines({k: str(v) for k, v in problem.env.items()} | dict(form.texts))
