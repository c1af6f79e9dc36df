"""Token positions of the unit space's named positions, in base and alternate prompts, aligned by slot.

A position is `last` (the final token), a task slot (the token or tokens of its value; a slot
written twice is `slot#1`, `slot#2` in reading order), or a token's distance from the end,
`-2`, `-3`, ... (what `all` expands to: `-T`, ..., `-2`, `last` for the longest prompt, T tokens;
a shorter prompt has no unit at the positions before its start). The base's and the
alternate's tokens of a position are paired in order, so both must have as many; where they
do not, one line says why.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import torch

from circuitfind.config.choices import ALL, LAST
from circuitfind.errors import CircuitfindError
from circuitfind.task.spec import Prompt, TaskSpec

Positions = Dict[str, List[int]]  # position name -> token indices in the unpadded prompt


def labelled_spans(spans: Sequence[Tuple[str, int, int]]) -> List[Tuple[str, int, int]]:
    """The slots' character spans in reading order, each under its label.

    A slot written more than once is split by mention, `s#1`, `s#2`, in reading order: in IOI
    the subject's first and second mentions play different roles."""
    mentions = Counter(slot for slot, _, _ in spans)
    seen: Counter = Counter()
    out = []
    for slot, start, end in sorted(spans, key=lambda s: s[1]):
        seen[slot] += 1
        out.append((slot if mentions[slot] == 1 else f"{slot}#{seen[slot]}", start, end))
    return out


def slot_positions(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[str, int, int]]) -> Positions:
    """Token indices of each slot value, by label, from the tokens' character offsets and the slots' spans."""
    return {
        label: [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        for label, start, end in labelled_spans(spans)
    }


def slot_labels(task: TaskSpec, prompts: Sequence[Prompt]) -> List[str]:
    """Every slot label written in these prompts (a slot written twice: `slot#1`, `slot#2`)."""
    labels = (label for prompt in prompts for label, _, _ in labelled_spans(task.spans(prompt)))
    return list(dict.fromkeys(labels))


class PositionFinder:
    """Finds each named position's tokens in prompts, and pairs a base's with its alternate's."""

    def __init__(self, tokenizer, task: TaskSpec, positions: Sequence[str]):
        self.tokenizer, self.task, self.positions = tokenizer, task, list(positions)
        self.needs_slots = names_slots(self.positions)
        if self.needs_slots and not getattr(tokenizer, "is_fast", False):
            raise CircuitfindError(
                "units.positions names task slots, which needs a fast tokenizer (character offsets); "
                "use the model's fast tokenizer or units.positions=[last]"
            )

    def tokens(self, prompt: Prompt) -> Tuple[int, Positions]:
        """The prompt's token count and the tokens of each named position it has."""
        enc = self.tokenizer(prompt.text, add_special_tokens=True, return_offsets_mapping=self.needs_slots)
        n = len(enc["input_ids"])
        found = slot_positions(enc["offset_mapping"], self.task.spans(prompt)) if self.needs_slots else {}
        found[LAST] = [n - 1]
        found.update({p: [n + int(p)] for p in self.positions if is_index(p) and -int(p) <= n})
        return n, found

    def aligned(self, base: Prompt, alt: Prompt, i: int) -> Tuple[List[List[int]], List[List[int]], int, int]:
        """Per position, the base's and the alternate's tokens, paired in order; and the two lengths."""
        (n_base, in_base), (n_alt, in_alt) = self.tokens(base), self.tokens(alt)
        where = f"pair {i} ({base.text[-30:]!r} / {alt.text[-30:]!r})"
        if n_base != n_alt and any(is_index(p) for p in self.positions):
            raise CircuitfindError(
                f"units.positions: token positions are counted from the end, and the base and alternate of {where} "
                f"are {n_base} and {n_alt} tokens; name slots instead (units.positions=[last, <slot>])"
            )
        for name in self.positions:
            if is_index(name) and name not in in_base:
                in_base[name] = in_alt[name] = []  # before this prompt's start: no unit here
                continue
            for prompt, found in (("base", in_base), ("alternate", in_alt)):
                if not found.get(name):
                    raise CircuitfindError(
                        f"units.positions: {name!r} is not in the {prompt} prompt of {where}; "
                        "choose positions every prompt has"
                    )
            if len(in_base[name]) != len(in_alt[name]):
                raise CircuitfindError(
                    f"units.positions: {name!r} is {len(in_base[name])} token(s) in the base prompt and "
                    f"{len(in_alt[name])} in the alternate of {where}; positions are aligned by slot, so give the "
                    "slot values that tokenise alike (one_token: true) or choose other positions"
                )
        used = Counter(t for name in self.positions for t in in_base[name])
        shared = [name for name in self.positions if any(used[t] > 1 for t in in_base[name])]
        if shared:
            raise CircuitfindError(
                f"units.positions: {' and '.join(shared)} share tokens in {where}; choose positions that do not overlap"
            )
        return [in_base[n] for n in self.positions], [in_alt[n] for n in self.positions], n_base, n_alt

    def encode(self, pairs, base_width: int, alt_width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, P, M) token indices of every position in the left-padded base and alternate prompts, -1 where a
        position has fewer than M tokens."""
        rows = [self.aligned(p.base, p.alt, i) for i, p in enumerate(pairs)]
        m = max(len(tokens) for base, _, _, _ in rows for tokens in base)
        base_pos = torch.full((len(pairs), len(self.positions), m), -1, dtype=torch.long)
        alt_pos = base_pos.clone()
        for b, (base, alt, n_base, n_alt) in enumerate(rows):
            for p, (tb, ta) in enumerate(zip(base, alt)):
                base_pos[b, p, : len(tb)] = torch.tensor(tb) + (base_width - n_base)  # left padding
                alt_pos[b, p, : len(ta)] = torch.tensor(ta) + (alt_width - n_alt)
        return base_pos, alt_pos


def is_index(position: str) -> bool:
    """A position given as its distance from the end, `-2`, `-3`, ..."""
    return position.startswith("-") and position[1:].isdigit() and int(position) <= -2


def expand_all(positions: Sequence[str], longest: int) -> Tuple[str, ...]:
    """`all` as every token of the longest prompt, counted from the end; other positions unchanged."""
    positions = tuple(positions)
    if ALL not in positions:
        return positions
    if len(positions) > 1:
        raise CircuitfindError(f"units.positions={list(positions)}: `all` already covers every position; give it alone")
    return tuple(str(-k) for k in range(longest, 1, -1)) + (LAST,)


def names_slots(positions: Sequence[str]) -> bool:
    """Whether any position is a task slot (not `last`, `all` or a distance from the end)."""
    return any(p not in (LAST, ALL) and not is_index(p) for p in positions)


def check_positions(positions: Sequence[str], labels: Sequence[str], task_name: str) -> None:
    """Every named position is `last`, `all`, a token index or a slot label the task writes."""
    known = [LAST, ALL, *labels]
    unknown = [p for p in positions if p not in known and not is_index(p)]
    if unknown:
        raise CircuitfindError(
            f"units.positions: {unknown[0]!r} is not a position of task {task_name}; choose from "
            f"{', '.join(known)} (a slot written twice is slot#1, slot#2) or a distance from the end (-2, -3, ...)"
        )
    if len(set(positions)) != len(positions) or not positions:
        raise CircuitfindError(f"units.positions={list(positions)}: give each position once, and at least one")
