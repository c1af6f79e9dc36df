"""Measuring the organism: held-out exact match per operation and prompt form, interchange
accuracy of the planted circuit, and where every head looks."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig

from circuitfind.organism.analysis import PARTS, SOURCES, attention_shares
from circuitfind.organism.data import Distribution, Encoder, test_forms
from circuitfind.organism.interchange import Interchange, Organism, plant_masks
from circuitfind.organism.problems import Problem, Variants
from circuitfind.task.encoding import position_ids


@torch.no_grad()
def exact_match(model, enc: Encoder, problems: Sequence[Problem], batch: int = 500) -> float:
    """Share of prompts whose greedy answer is exactly right.

    Greedy decoding produces the answer then </s> exactly when every one of those tokens is
    the argmax given the correct ones before it, so one teacher-forced pass decides it.
    """
    correct = 0
    for start in range(0, len(problems), batch):
        ids, attn, labels = enc.with_answers(problems[start : start + batch])
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
        target = labels[:, 1:]
        ok = (logits[:, :-1].argmax(-1) == target) | (target == -100)
        correct += int(ok.all(dim=1).sum())
    return correct / len(problems)


def heldout_prompts(dist: Distribution, op: str, form: Optional[Variants], n: int, rng: random.Random) -> List[Problem]:
    """Up to n test problems of one operation (held out, if any are), written in `form` (None: the paper's)."""
    pool = dist.test_pool(op)
    problems = rng.sample(pool, min(n, len(pool)))
    return problems if form is None else [form.apply(p, rng) for p in problems]


def heldout_check(model, enc: Encoder, dist: Distribution, rng: random.Random, n: int = 100) -> Dict[str, float]:
    """Exact match on n held-out prompts per operation, in the training mix of forms (a progress check)."""
    model.eval()
    check = {}
    for op in dist.ops:
        pool = dist.test_pool(op)
        check[f"heldout_{op}"] = exact_match(
            model, enc, [dist.form(p, rng) for p in rng.sample(pool, min(n, len(pool)))]
        )
    model.train()
    return check


@torch.no_grad()
def evaluate(org: Organism, cfg: DictConfig) -> Dict[str, Dict]:
    """Held-out exact match per operation and prompt form; interchange accuracy per operation."""
    model, enc, dist, space = org.model, org.enc, org.dist, org.sites.space
    was_training = model.training
    model.eval()
    rng = random.Random(f"eval/{cfg.seed}")
    forms = test_forms(dist.space.variants)
    accuracy = {
        op: {
            name: exact_match(model, enc, heldout_prompts(dist, op, form, cfg.n_eval, rng))
            for name, form in forms.items()
        }
        for op in dist.ops
    }
    circuit_mask, strict_mask = plant_masks(cfg.iit.circuit, space)
    alt_ops = list(cfg.iit.ops) or dist.ops
    interchange: Dict[str, Dict[str, float]] = {"vd": {}, "oi": {}, "strict": {}}
    alone: Dict[str, Dict[str, Dict]] = {position: {} for position in cfg.iit.alone_positions} if cfg.iit.alone else {}
    for op in dist.ops:
        pairs = Interchange(org, [op], alt_ops, cfg.n_eval, rng, test=True)
        logits = pairs.logits(org, circuit_mask, strict_mask, strict=True)
        keep = pairs.informative()
        for name in interchange:
            hit = logits[name].argmax(-1) == pairs.targets()[name]
            interchange[name][op] = hit[keep[name]].float().mean().item() if keep[name].any() else float("nan")
        for position in alone:
            alone[position][op] = worst_alone(org, pairs, position, keep["alone"])
    problems = [dist.form(rng.choice(dist.test_pool(rng.choice(dist.ops))), rng) for _ in range(cfg.n_eval)]
    heads = [unit for unit in space.units() if unit.kind == "head"]
    attention = {}  # source -> head -> part -> share of attention
    for source in SOURCES:
        shares = attention_shares(model, enc, problems, [(u.layer, u.head) for u in heads], source)  # (heads, parts)
        attention[source] = {u.name: dict(zip(PARTS, map(float, row))) for u, row in zip(heads, shares)}
    model.train(was_training)
    record = {"accuracy": accuracy, "interchange": interchange, "attention": attention}
    return record | ({"alone": alone} if alone else {})


def worst_alone(org: Organism, pairs: Interchange, position: str, keep: torch.Tensor) -> Dict:
    """Every unit at `position` patched alone from the other-x prompts: the unit that moves the most
    informative answers, and the share it keeps (the alone term's accuracy at its weakest unit)."""
    units = list(org.sites.space.units())
    hits = pairs.alone_logits(org, position, units).argmax(-1).view(len(units), -1) == pairs.base_digit
    kept = hits[:, keep].float().mean(1) if keep.any() else torch.full((len(units),), float("nan"))
    worst = int(kept.nan_to_num(1.0).argmin())
    return {"unit": units[worst].name, "kept": kept[worst].item()}
