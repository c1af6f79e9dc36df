"""How a prompt is written: its form (template, variable names, line edits), drawn per prompt,
and the rendering of a template into lines with the character span of every slot value."""

from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from circuitfind.errors import CircuitfindError
from circuitfind.task.expressions import Expression

Line = Tuple[str, List[Tuple[str, int, int]]]  # a line's text, and the (slot, start, end) spans in it


@dataclass(frozen=True)
class Form:
    """How a prompt is written: the template, the texts of form slots, and line edits."""

    template: str
    texts: Tuple[Tuple[str, str], ...] = ()  # (slot, text) of the slots bound by variants
    edits: Tuple[Tuple[Any, ...], ...] = ()  # ("swap", i, j) | ("insert", line, text, its slot texts)

    def lines(self, texts: Mapping[str, str]) -> List[Line]:
        """The template's lines filled in with slot `texts`, after the edits, with each value's span."""
        lines = [filled(pieces, texts) for pieces in parsed_lines(self.template)]
        for edit in self.edits:
            if edit[0] == "swap":
                i, j = edit[1:]
                lines[i], lines[j] = lines[j], lines[i]
            else:
                line, text, slots = edit[1:]
                lines.insert(line, filled(parsed_lines(text)[0], {**texts, **dict(slots)}))
        return lines


class Variant:
    """One dimension of a prompt's form, drawn once per prompt (always with the same random calls)."""

    def __init__(
        self, name: str, cfg: Mapping, slots: Mapping[str, List[Any]], n_lines: int, tables: Mapping, earlier: set
    ):
        self.name, where = name, f"task.variants.{name}"
        self.p = cfg.get("p")
        self.templates = list(cfg.get("templates") or [])
        self.bind = list(cfg.get("bind") or [])
        self.values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in cfg.get("values") or []]
        self.swap = list(cfg.get("swap") or [])
        self.insert = cfg.get("insert")
        self.at = list(cfg.get("at") or [0, n_lines - 1])
        self.slots = dict(slots)  # the inserted line's own slots: name -> domain
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


@functools.lru_cache(maxsize=None)
def parsed_lines(template: str) -> List[List[Tuple[str, Optional[str]]]]:
    """A template's lines as (literal text, slot or None) pieces."""
    return [
        [(literal, field) for literal, field, _, _ in string.Formatter().parse(line)] for line in template.split("\n")
    ]


def filled(pieces: Sequence[Tuple[str, Optional[str]]], texts: Mapping[str, str]) -> Line:
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
