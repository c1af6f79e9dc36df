"""Interchange interventions on the organism: the fixed masks that plant a circuit, and patched runs.

The same hooks and fixed 0/1 masks that DBM later uses to find the circuit, at the circuit's
position (`iit.position`): the final token (`last`, the shipped organism), or the query's mention
of x's name (`xname#2`: the first token of the last line, `x + y = `):

    vd      circuit patched from the prompt with another x  -> the alternate's first digit
    oi      circuit patched from the prompt with another op  -> the base's first digit
    strict  every head outside the circuit, and every MLP in a layer before it, patched from
            the prompt with another x -> the base's first digit (x enters that position only via the circuit)
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
from circuitfind.model.space import ComponentSpace
from circuitfind.organism.data import Distribution, Encoder
from circuitfind.task.encoding import position_ids


def plant_masks(circuit: Sequence[str], space: ComponentSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed masks (1, L, H+1), 0 = patched: the circuit, and the strict term's complement."""
    what = f"iit.circuit={list(circuit)}"
    if not circuit:
        raise CircuitfindError(f"{what}: empty; name components L<layer>.H<head> or L<layer>.MLP of this model")
    units = space.index(circuit, what)
    circuit_mask = torch.ones(1, *space.shape)
    for unit in units:
        circuit_mask[0, unit.layer, unit.col] = 0
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


@dataclass
class Organism:
    """The model being trained, where its components are, how its prompts are drawn and tokenised,
    and the position its circuit is planted at."""

    model: nn.Module
    sites: Sites
    enc: Encoder
    dist: Distribution
    position: str = "last"

    def tokens(self, problems: Sequence, width: int) -> torch.Tensor:
        """The token index of the circuit's position in each left-padded prompt `width` tokens wide. (B,)

        The tokenizer has one token per character, so the query's x (the first character of the last
        line) is as many tokens from the end as the last line has characters."""
        if self.position == "last":
            return torch.full((len(problems),), width - 1, dtype=torch.long)
        last_lines = [p.render(self.dist.template).split("\n")[-1] for p in problems]
        return torch.tensor([width - len(line) for line in last_lines], dtype=torch.long)

    def record(self, ids: torch.Tensor, attn: torch.Tensor, toks: torch.Tensor, grad: bool = False) -> SiteValues:
        """Every component's clean value at token `toks` of each prompt (with its graph if `grad`).

        With the graph kept, interchange training also trains the alternate's run: the loss that
        asks the circuit to carry the alternate's x reaches the circuit heads' own weights.
        """
        rows = torch.arange(ids.shape[0])
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
        self.n = n
        self.base_ids, self.base_attn = enc.prompts(bases)
        self.base_toks = org.tokens(bases, self.base_ids.shape[1])
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

    def targets(self) -> Dict[str, torch.Tensor]:
        """The first digit each patched run should give. (B,)"""
        return {"vd": self.vd_digit, "oi": self.base_digit, "strict": self.base_digit}

    def informative(self) -> Dict[str, torch.Tensor]:
        """Pairs whose alternate starts with another digit: the others are right even unpatched. (B,) bool"""
        moved = self.vd_digit != self.base_digit
        return {"vd": moved, "oi": self.oi_digit != self.base_digit, "strict": moved}
