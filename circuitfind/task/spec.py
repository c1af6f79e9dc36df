"""A task from its YAML: slots and their domains, the answer, constraints, prompt forms, balance.

A *problem* is one value per enumerated slot (every combination that satisfies the
constraints is a problem); a *form* is how its prompt is written (variable names, line
order, a distractor line), drawn at random per prompt and shared by a base and its
alternate; a *prompt* is a problem rendered in a form, with its answer text.
"""

from __future__ import annotations

import functools
import itertools
import random
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from circuitfind.errors import CircuitfindError
from circuitfind.task.expressions import Expression

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
class Form:
    """How a prompt is written: the template, the texts of form slots, and line edits."""

    template: str
    texts: Tuple[Tuple[str, str], ...] = ()  # (slot, text) of the slots bound by variants
    edits: Tuple[Tuple[Any, ...], ...] = ()  # ("swap", i, j) | ("insert", line, text)


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


class Variant:
    """One dimension of a prompt's form, drawn once per prompt (always with the same random calls)."""

    def __init__(self, name: str, cfg: Mapping, n_lines: int, tables: Mapping, earlier: set):
        self.name, where = name, f"task.variants.{name}"
        self.p = cfg.get("p")
        self.templates = list(cfg.get("templates") or [])
        self.bind = list(cfg.get("bind") or [])
        self.values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in cfg.get("values") or []]
        self.swap = list(cfg.get("swap") or [])
        self.insert = cfg.get("insert")
        self.at = list(cfg.get("at") or [0, n_lines - 1])
        self.slots = {s: domain_of(c, f"{where}.slots.{s}") for s, c in (cfg.get("slots") or {}).items()}
        kinds = [
            k
            for k, on in (
                ("templates", self.templates),
                ("bind", self.bind),
                ("swap", self.swap),
                ("insert", self.insert),
            )
            if on
        ]
        if len(kinds) != 1:
            raise CircuitfindError(
                f"{where} needs exactly one of templates, bind, swap or insert; it has {kinds or 'none'}"
            )
        self.kind = kinds[0]
        if self.kind in ("swap", "insert") and not (self.p is not None and 0 <= self.p <= 1):
            raise CircuitfindError(f"{where}.p={self.p} is a probability; give a value in [0, 1]")
        if self.kind == "bind" and (not self.values or any(len(v) != len(self.bind) for v in self.values)):
            raise CircuitfindError(
                f"{where}.values must list tuples of {len(self.bind)} values, one for each of {self.bind}"
            )
        if self.kind == "swap" and not (len(self.swap) == 2 and all(0 <= i < n_lines for i in self.swap)):
            raise CircuitfindError(f"{where}.swap={self.swap}: give two line numbers in 0..{n_lines - 1}")
        if self.kind == "insert" and not (len(self.at) == 2 and 0 <= self.at[0] <= self.at[1] <= n_lines):
            raise CircuitfindError(f"{where}.at={self.at}: give [first, last] line positions in 0..{n_lines}")
        form_names = earlier | set(self.bind) | set(self.slots)  # `where` reads slots drawn before
        self.where = [Expression(w, form_names, tables, f"{where}.where") for w in cfg.get("where") or []]

    @property
    def bound(self) -> List[str]:
        """The slots this variant gives a text to."""
        return self.bind + list(self.slots)

    def draw(self, rng: random.Random, texts: Dict[str, str], edits: list, template: str) -> str:
        """Draw this dimension: add slot texts and edits; return the (possibly replaced) template."""
        if self.kind == "templates":
            return rng.choice(self.templates)
        if self.kind == "bind":
            texts.update(zip(self.bind, map(str, rng.choice(self.values))))
            return template
        if rng.random() >= self.p:
            return template
        if self.kind == "swap":
            edits.append(("swap", *self.swap))
            return template
        drawn = dict(texts)
        for slot, domain in self.slots.items():
            fits = [v for v in domain if self._allowed(drawn | {slot: str(v)})]
            if not fits:
                return template  # no value fits beside the names drawn: no insertion
            drawn[slot] = str(rng.choice(fits))
        line = rng.choice(range(self.at[0], self.at[1] + 1))
        edits.append(("insert", line, self.insert, tuple((s, drawn[s]) for s in self.slots)))
        return template

    def _allowed(self, texts: Mapping[str, str]) -> bool:
        """The variant's `where` conditions that can be judged with the slots drawn so far."""
        return all(w(texts) for w in self.where if w.used <= texts.keys())


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
            self.variants.append(Variant(n, v, len(lines), self.tables, {s for w in self.variants for s in w.bound}))
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
        with new_key, only those whose answer has another balance key.

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

    def _lines(self, problem: Problem, form: Form) -> List[Tuple[str, List[Tuple[str, int, int]]]]:
        """The prompt's lines, each with the spans of the slot values in it, after the form's edits."""
        texts = {k: str(v) for k, v in problem.env.items()} | dict(form.texts)
        lines = [filled(pieces, texts) for pieces in parsed_lines(form.template)]
        for edit in form.edits:
            if edit[0] == "swap":
                i, j = edit[1:]
                lines[i], lines[j] = lines[j], lines[i]
            else:
                line, text, slots = edit[1:]
                lines.insert(line, filled(parsed_lines(text)[0], texts | dict(slots)))
        return lines


@functools.lru_cache(maxsize=None)
def parsed_lines(template: str) -> List[List[Tuple[str, Optional[str]]]]:
    """A template's lines as (literal text, slot or None) pieces."""
    return [
        [(literal, field) for literal, field, _, _ in string.Formatter().parse(line)] for line in template.split("\n")
    ]


def filled(
    pieces: Sequence[Tuple[str, Optional[str]]], texts: Mapping[str, str]
) -> Tuple[str, List[Tuple[str, int, int]]]:
    """One line with its slots filled in, and the (slot, start, end) span of each value."""
    parts, spans, position = [], [], 0
    for literal, slot in pieces:
        parts.append(literal)
        position += len(literal)
        if slot is not None:
            value = texts[slot]
            spans.append((slot, position, position + len(value)))
            parts.append(value)
            position += len(value)
    return "".join(parts), spans
