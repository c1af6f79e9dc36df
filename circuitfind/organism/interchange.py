"""Interchange interventions on the organism: the fixed masks that plant a circuit, and patched runs.

The same hooks and fixed 0/1 masks that DBM later uses to find the circuit, at the circuit's
position (`iit.position`): the final token (`last`, the shipped organism), or the query's mention
of x's name (`xname#2`: the first token of the last line, `x + y = `):

    vd      circuit patched from the prompt with another x  -> the alternate's first digit
    oi      circuit patched from the prompt with another op  -> the base's first digit
    strict  every head outside the circuit, and every MLP in a layer before it, patched from
            the prompt with another x -> the base's first digit (x enters that position only via the circuit)
    alone   one unit at another position (x's digits, the final token), patched alone from the
            prompt with another x -> the base's first digit (so that no single unit there carries x
            by itself, and a circuit of one head is the only cut of its size)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch import nn

from circuitfind.errors import CircuitfindError
from circuitfind.model.components import Sites
from circuitfind.model.hooks import SiteIndex, SiteValues, patch_sites, record_values
from circuitfind.model.masks import masks_of
from circuitfind.model.space import ComponentSpace, Unit
from circuitfind.organism.data import Distribution, Encoder
from circuitfind.task.encoding import position_ids


def plant_masks(circuit: Sequence[str], space: ComponentSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed masks (1, L, H+1), 0 = patched: the circuit, and the strict term's complement."""
    what = f"iit.circuit={list(circuit)}"
    if not circuit:
        raise CircuitfindError(f"{what}: empty; name components L<layer>.H<head> or L<layer>.MLP of this model")
    units = space.index(circuit, what)
    circuit_mask = masks_of([[space.flat(u) for u in units]], space.shape)
    strict_mask = torch.ones(1, *space.shape)
    strict_mask[0, :, : space.n_heads] = 0  # every head ...
    strict_mask[0, : min(unit.layer for unit in units), space.n_heads] = 0  # ... and the MLPs before the circuit
    strict_mask[circuit_mask == 0] = 1  # ... except the circuit itself
    return circuit_mask, strict_mask


def final_logits(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Logits at the final prompt position. (B, T) -> (B, V)"""
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


POSITIONS = ("last", "xname#2")  # where a circuit can be planted
ALONE_POSITIONS = ("x", "last", "xname#2")  # where the alone term patches single units


def x_value_chars(problem, template: str) -> range:
    """Where x's value sits in the rendered prompt: the characters after `<x's name> = ` on its line."""
    text, start = problem.render(template), 0
    for line in text.split("\n")[:-1]:
        if line.startswith(f"{problem.names[0]} = "):
            start += len(problem.names[0]) + 3
            return range(start, start + len(str(problem.x)))
        start += len(line) + 1
    raise CircuitfindError(
        f"no line defines {problem.names[0]} in {text!r}; write it as `{problem.names[0]} = <value>`"
    )


@dataclass
class Organism:
    """The model being trained, where its components are, how its prompts are drawn and tokenised,
    and the position its circuit is planted at."""

    model: nn.Module
    sites: Sites
    enc: Encoder
    dist: Distribution
    position: str = "last"

    def tokens(self, problems: Sequence, width: int, position: str | None = None) -> torch.Tensor:
        """The token indices of `position` (default: the circuit's) in each left-padded prompt `width`
        tokens wide: (B,) for `last` and `xname#2`, (B, digits) for `x`, whose values have equal lengths.

        The tokenizer has one token per character and none after the prompt, so character c of a
        prompt of n characters is token width - n + c."""
        position = position or self.position
        if position == "last":
            return torch.full((len(problems),), width - 1, dtype=torch.long)
        texts = [p.render(self.dist.template) for p in problems]
        if position == "xname#2":  # the first character of the last line
            return torch.tensor([width - len(t.split("\n")[-1]) for t in texts], dtype=torch.long)
        chars = [list(x_value_chars(p, self.dist.template)) for p in problems]
        return torch.tensor([[width - len(t) + c for c in cs] for t, cs in zip(texts, chars)], dtype=torch.long)

    def record(self, ids: torch.Tensor, attn: torch.Tensor, toks: torch.Tensor, grad: bool = False) -> SiteValues:
        """Every component's clean value at token `toks` of each prompt (with its graph if `grad`):
        toks (B,), or (B, M) for M tokens per prompt, whose values come prompt by prompt.

        With the graph kept, interchange training also trains the alternate's run: the loss that
        asks the circuit to carry the alternate's x reaches the circuit heads' own weights.
        """
        toks = toks.view(ids.shape[0], -1)
        rows = torch.arange(ids.shape[0]).repeat_interleave(toks.shape[1])
        toks = toks.flatten()
        with torch.set_grad_enabled(grad), record_values(self.sites, rows, toks, grad=grad) as values:
            self.model.model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
        return values

    def patched_logits(self, mask: torch.Tensor, ids, attn, toks: torch.Tensor, alt: SiteValues) -> torch.Tensor:
        """Final-position logits of the base prompts with the components mask == 0 taken from `alt` at `toks`."""
        rows, zeros = torch.arange(ids.shape[0]), torch.zeros(ids.shape[0], dtype=torch.long)
        with patch_sites(self.sites, mask, alt, SiteIndex(rows, zeros, zeros, toks, toks)):
            return final_logits(self.model, ids, attn)


class Interchange:
    """One batch of interchange pairs: base prompts, their other-x and other-op alternates."""

    def __init__(
        self,
        org: Organism,
        base_ops: Sequence[str],
        alt_ops: Sequence[str],
        n: int,
        rng: random.Random,
        test: bool = False,
        variants: bool = True,
    ):
        dist, enc = org.dist, org.enc
        pool = {op: dist.test_pool(op) if test else dist.train[op] for op in base_ops}
        bases = [dist.form(rng.choice(pool[rng.choice(list(base_ops))]), rng, variants) for _ in range(n)]
        vd_alts = [dist.vd_alternate(b, rng) for b in bases]
        oi_alts = [dist.oi_alternate(b, alt_ops, rng) for b in bases]
        self.n, self.bases, self.vd_alts = n, bases, vd_alts
        self.base_ids, self.base_attn = enc.prompts(bases)
        self.base_toks = org.tokens(bases, self.base_ids.shape[1])
        self.vd_ids, self.vd_attn = enc.prompts(vd_alts)
        alt_ids, alt_attn = enc.prompts(vd_alts + oi_alts)
        # rows: the vd alternates, then the oi ones; trained through when training
        alt_toks = org.tokens(vd_alts + oi_alts, alt_ids.shape[1])
        self.alt = org.record(alt_ids, alt_attn, alt_toks, grad=torch.is_grad_enabled() and not test)
        self.base_digit = enc.first_digits(bases)
        self.vd_digit = enc.first_digits(vd_alts)
        self.oi_digit = enc.first_digits(oi_alts)

    def logits(
        self, org: Organism, circuit_mask: torch.Tensor, strict_mask: torch.Tensor, strict: bool
    ) -> Dict[str, torch.Tensor]:
        """Patched logits (B, V): circuit from the vd alternates, from the oi ones, the rest from the vd ones."""
        ids, attn = self.base_ids.repeat(2, 1), self.base_attn.repeat(2, 1)
        both = org.patched_logits(circuit_mask, ids, attn, self.base_toks.repeat(2), self.alt)
        out = {"vd": both[: self.n], "oi": both[self.n :]}
        if strict:
            vd_alt = self.alt.rows(slice(0, self.n))
            out["strict"] = org.patched_logits(strict_mask, self.base_ids, self.base_attn, self.base_toks, vd_alt)
        return out

    def alone_logits(self, org: Organism, position: str, units: Sequence[Unit]) -> torch.Tensor:
        """Final-position logits with each of `units` alone patched at `position` from the vd
        alternates: one copy of the batch per unit. (len(units) * B, V), unit-major"""
        base_toks = org.tokens(self.bases, self.base_ids.shape[1], position).view(self.n, -1)  # (B, M)
        alt_toks = org.tokens(self.vd_alts, self.vd_ids.shape[1], position).view(self.n, -1)
        rows = torch.arange(self.n).repeat_interleave(base_toks.shape[1])
        # the alternates' values as they are: this term trains the base's run, not theirs
        alt = org.record(self.vd_ids, self.vd_attn, alt_toks)
        space = org.sites.space
        masks = masks_of([[space.flat(u)] for u in units], space.shape)  # each unit alone
        zeros = torch.zeros_like(rows)
        where = SiteIndex(rows, zeros, zeros, base_toks.flatten(), alt_toks.flatten())
        ids, attn = self.base_ids.repeat(len(units), 1), self.base_attn.repeat(len(units), 1)
        with patch_sites(org.sites, masks, alt, where):
            return final_logits(org.model, ids, attn)

    def targets(self) -> Dict[str, torch.Tensor]:
        """The first digit each patched run should give. (B,)"""
        return {"vd": self.vd_digit, "oi": self.base_digit, "strict": self.base_digit, "alone": self.base_digit}

    def informative(self) -> Dict[str, torch.Tensor]:
        """Pairs whose alternate starts with another digit: the others are right even unpatched. (B,) bool"""
        moved = self.vd_digit != self.base_digit
        return {"vd": moved, "oi": self.oi_digit != self.base_digit, "strict": moved, "alone": moved}
