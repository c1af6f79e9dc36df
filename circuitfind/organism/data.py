"""What the organism is trained and tested on: prompts, the held-out split, and tensors.

Every (operation, x, y) falls on one side of a fixed split: the held-out side is never
trained on, in any prompt form, nor used as an interchange alternate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from circuitfind.organism.problems import Problem, TaskSpace, Variants
from circuitfind.task.encoding import left_pad

Key = tuple[str, int, int]  # (op, x, y)


def _key(p: Problem) -> Key:
    return (p.op, p.x, p.y)


@dataclass
class Distribution:
    """The training and held-out prompts of every operation."""

    space: TaskSpace
    ops: List[str]
    op_weights: List[float]  # sampling weight of each operation
    template: str
    paper_share: float  # probability that a prompt is in the paper's exact template
    train: Dict[str, List[Problem]]  # op -> canonical problems trained on
    heldout: Dict[str, List[Problem]]  # op -> canonical problems never trained on
    heldout_keys: frozenset  # every held-out (op, x, y)

    @classmethod
    def split(cls, space: TaskSpace, d: Mapping, seed: int) -> "Distribution":
        """From the `dataset` config: hold out `d.heldout[op]` of each operation's problems
        (the same ones for a given seed)."""
        train, heldout = {}, {}
        for op in d["ops"]:
            problems = space.bases([op])
            random.Random(f"heldout/{seed}/{op}").shuffle(problems)
            n_out = round(d["heldout"].get(op, 0.0) * len(problems))
            heldout[op], train[op] = problems[:n_out], problems[n_out:]
        keys = frozenset(_key(p) for ps in heldout.values() for p in ps)
        weights = [d["op_weights"].get(op, 1.0) for op in d["ops"]]
        return cls(space, list(d["ops"]), weights, d["template"], d["paper_share"], train, heldout, keys)

    def form(self, problem: Problem, rng: random.Random, variants: bool = True) -> Problem:
        """The problem in a random prompt form: the paper's template, or (if `variants`) a variant."""
        if not variants or rng.random() < self.paper_share:
            return problem
        return self.space.variants.apply(problem, rng)

    def sample(self, rng: random.Random, variants: bool = True) -> Problem:
        """A training prompt: uniform over operations, then over that operation's problems."""
        op = rng.choices(self.ops, self.op_weights)[0]
        return self.form(rng.choice(self.train[op]), rng, variants)

    def test_pool(self, op: str) -> List[Problem]:
        """The problems accuracy is measured on: the held-out ones, or all when none are held out."""
        return self.heldout[op] or self.train[op]

    def is_heldout(self, p: Problem) -> bool:
        return _key(p) in self.heldout_keys

    def vd_alternate(self, base: Problem, rng: random.Random) -> Problem:
        """The base with another x, as Value Dependence draws it (same form, non-negative answer),
        never a held-out problem."""
        alts = [replace(base, x=x) for x in self.space.ranges[base.op][0] if x != base.x]
        rng.shuffle(alts)
        return next((a for a in alts if a.answer >= 0 and not self.is_heldout(a)), base)  # base: no change asked

    def oi_alternate(self, base: Problem, ops: Sequence[str], rng: random.Random) -> Problem:
        """The base with another operation of `ops`, as Operation Invariance draws it (non-negative answer)."""
        alts = [a for a in (replace(base, op=op) for op in ops if op != base.op) if a.answer >= 0]
        return rng.choice(alts) if alts else base


def test_forms(variants: Variants) -> Dict[str, Optional[Variants]]:
    """The prompt forms accuracy is reported on, each alone, plus all of them at once.

    None stands for the paper's exact template. Forms the training variants never use are left out.
    """
    other_names = [n for n in variants.names if tuple(n) != ("x", "y")]
    forms: Dict[str, Optional[Variants]] = {"paper": None}
    if other_names:
        forms["names"] = Variants(names=other_names)
    if variants.y_first > 0:
        forms["y_first"] = Variants(y_first=1.0)
    if variants.distractor > 0:
        forms["distractor"] = Variants(distractor=1.0, distractor_names=variants.distractor_names)
    if len(forms) > 2:
        forms["all"] = Variants(
            names=variants.names,
            y_first=1.0 if variants.y_first > 0 else 0.0,
            distractor=1.0 if variants.distractor > 0 else 0.0,
            distractor_names=variants.distractor_names,
        )
    return forms


class Encoder:
    """Prompts (and answers) as left-padded tensors, so that the final prompt token is at -1."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def _ids(self, texts: List[str]) -> List[List[int]]:
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def prompts(self, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt tokens only. -> ids, attention mask (B, T)"""
        return left_pad(self._ids([p.render(self.template) for p in problems]), self.pad_id)

    def first_digits(self, problems: Sequence[Problem]) -> torch.Tensor:
        """Token of each answer's first digit. (B,)"""
        return torch.tensor(self.tokenizer.convert_tokens_to_ids([str(p.answer)[0] for p in problems]))

    def with_answers(self, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt, answer digits and </s>; labels are -100 except on the answer and </s>.

        -> ids, attention mask, labels (B, T); labels[:, t] is the token to predict at t - 1.
        """
        prompts = self._ids([p.render(self.template) for p in problems])
        answers = self._ids([str(p.answer) for p in problems])
        bos = self.tokenizer.bos_token_id
        answers = [[t for t in a if t != bos] + [self.eos_id] for a in answers]
        ids, attn = left_pad([p + a for p, a in zip(prompts, answers)], self.pad_id)
        labels = torch.full_like(ids, -100)
        for i, a in enumerate(answers):
            labels[i, ids.shape[1] - len(a) :] = ids[i, ids.shape[1] - len(a) :]
        return ids, attn, labels
