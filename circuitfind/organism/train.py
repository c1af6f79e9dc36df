"""Training the organism: the answer's next-token loss plus interchange-intervention losses.

The interchange losses plant a known circuit (`iit.circuit`) at the final prompt position,
with the same hooks and fixed 0/1 masks that DBM later uses to find it:

    vd      circuit patched from the prompt with another x  -> the alternate's first digit
    oi      circuit patched from the prompt with another op  -> the base's first digit
    strict  every head outside the circuit, and every MLP in a layer before it, patched from
            the prompt with another x -> the base's first digit (x enters only via the circuit)
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from circuitfind.components import ComponentLayout, Sites, locate_components
from circuitfind.data import OPERATIONS, Problem, Variants, check_template, task_space, variants_from_config
from circuitfind.errors import CircuitfindError
from circuitfind.organism.analysis import PARTS, SOURCES, attention_shares
from circuitfind.organism.data import Distribution, Encoder, test_forms
from circuitfind.patching import FinalValues, hooks, patch_final_position, record_final_values
from circuitfind.tokenizer import build_char_tokenizer
from circuitfind.tokens import position_ids

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> Distribution:
    """Check the whole config and build the distribution, before any model exists."""
    d, o, m, iit = cfg.dataset, cfg.optim, cfg.model, cfg.iit
    unknown = [op for op in list(d.ops) if op not in OPERATIONS]
    if unknown:
        raise CircuitfindError(f"dataset.ops has unknown operations {unknown}; choose from {sorted(OPERATIONS)}")
    checks = [
        (len(d.ops) >= 1, "dataset.ops is empty; give at least one operation, e.g. [add, sub, mul]"),
        (set(iit.ops) <= set(d.ops), f"iit.ops={list(iit.ops)} must be a subset of dataset.ops={list(d.ops)}"),
        (0 <= d.paper_share <= 1, f"dataset.paper_share={d.paper_share} is a probability; give a value in [0, 1]"),
        (
            set(d.heldout) <= set(d.ops),
            f"dataset.heldout names {sorted(set(d.heldout) - set(d.ops))}, not in dataset.ops",
        ),
        (all(0 <= f < 1 for f in d.heldout.values()), f"dataset.heldout={dict(d.heldout)}; give shares in [0, 1)"),
        (
            set(d.op_weights) <= set(d.ops),
            f"dataset.op_weights names {sorted(set(d.op_weights) - set(d.ops))}, not in dataset.ops",
        ),
        (all(w > 0 for w in d.op_weights.values()), f"dataset.op_weights={dict(d.op_weights)}; give weights > 0"),
        (
            o.steps >= 1 and o.batch_size >= 1 and iit.batch_size >= 1,
            "optim.steps, optim.batch_size and iit.batch_size must be >= 1",
        ),
        (
            iit.start >= 0 and iit.ramp >= 0,
            f"iit.start={iit.start} and iit.ramp={iit.ramp} are step counts; give values >= 0",
        ),
        (o.lr > 0, f"optim.lr={o.lr}; the learning rate must be > 0"),
        (min(iit.vd, iit.oi, iit.strict) >= 0, "iit.vd, iit.oi and iit.strict are loss weights; give values >= 0"),
        (
            m.n_layers >= 1 and m.n_heads >= 1 and m.hidden % (2 * m.n_heads) == 0,
            f"model.hidden={m.hidden} must be a multiple of 2 * model.n_heads={2 * m.n_heads} (rotary embeddings)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise CircuitfindError(message)
    check_template(d.template)
    space = task_space(d.ranges, list(d.ops), alt_ops=list(d.ops), variants=variants_from_config(d.variants))
    for op in d.ops:
        if not space.bases([op]):
            raise CircuitfindError(f"dataset.ranges.{op} gives no problem with a non-negative answer; widen it")
    layout = ComponentLayout(m.n_layers, m.n_heads, m.hidden // m.n_heads)
    component_index(iit.circuit, layout)
    dist = Distribution.split(space, d, cfg.seed)
    for op, problems in dist.train.items():
        if not problems or (d.heldout.get(op, 0) > 0 and not dist.heldout[op]):
            raise CircuitfindError(
                f"dataset.ranges.{op} has too few problems to hold out {d.heldout.get(op, 0):.0%}; widen it"
            )
    return dist


def component_index(names: Sequence[str], layout: ComponentLayout) -> List[tuple[int, int]]:
    """(layer, column) in the mask of each named component (`L2.H3`, `L1.MLP`)."""
    all_names = layout.names()
    unknown = [n for n in names if n not in all_names]
    if unknown or not names:
        raise CircuitfindError(
            f"iit.circuit={list(names)}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
            f"name components L<layer>.H<head> or L<layer>.MLP of this {layout.n_layers}x{layout.n_heads} model"
        )
    width = layout.n_heads + 1
    return [divmod(all_names.index(n), width) for n in names]


def plant_masks(circuit: Sequence[str], layout: ComponentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed masks (1, L, H+1), 0 = patched: the circuit, and the strict term's complement."""
    index = component_index(circuit, layout)
    circuit_mask = torch.ones(1, *layout.shape)
    for layer, col in index:
        circuit_mask[0, layer, col] = 0
    strict_mask = torch.ones(1, *layout.shape)
    strict_mask[0, :, : layout.n_heads] = 0  # every head ...
    strict_mask[0, : min(layer for layer, _ in index), layout.n_heads] = 0  # ... and the MLPs before the circuit
    strict_mask[circuit_mask == 0] = 1  # ... except the circuit itself
    return circuit_mask, strict_mask


def build_model(m: DictConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden,
        intermediate_size=m.intermediate,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads,
        max_position_embeddings=m.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lm_loss(model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens (labels != -100). ids, attn, labels (B, T)"""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def final_logits(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Logits at the final prompt position. (B, T) -> (B, V)"""
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


@contextmanager
def record_with_grad(sites: Sites) -> Iterator[FinalValues]:
    """Like patching.record_final_values, but the values keep their graph.

    Interchange training then also trains the alternate's run: the loss that asks the circuit
    to carry the alternate's x reaches the circuit heads' own weights (with detached values it
    could only train the components that read them).
    """
    n = sites.layout.n_layers
    values = FinalValues(heads=[None] * n, mlps=[None] * n)

    def keep(store: list, layer: int, from_input: bool):
        def hook(module, args, output=None):
            store[layer] = (args[0] if from_input else output)[:, -1]

        return hook

    handles = [m.register_forward_pre_hook(keep(values.heads, i, True)) for i, m in enumerate(sites.head_projs)]
    handles += [m.register_forward_hook(keep(values.mlps, i, False)) for i, m in enumerate(sites.mlps)]
    with hooks(handles):
        yield values


def record(model, sites: Sites, ids: torch.Tensor, attn: torch.Tensor, grad: bool = False) -> FinalValues:
    """Every component's clean final-position value on some prompts (with its graph if `grad`)."""
    with torch.set_grad_enabled(grad), (record_with_grad if grad else record_final_values)(sites) as values:
        model.model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    return values


def rows(values: FinalValues, sl: slice) -> FinalValues:
    return FinalValues(heads=[h[sl] for h in values.heads], mlps=[m[sl] for m in values.mlps])


def patched_logits(model, sites: Sites, mask: torch.Tensor, ids, attn, alt: FinalValues) -> torch.Tensor:
    """Final-position logits of the base prompts with the components mask == 0 taken from `alt`."""
    with patch_final_position(sites, mask, alt):
        return final_logits(model, ids, attn)


class Interchange:
    """One batch of interchange pairs: base prompts, their other-x and other-op alternates."""

    def __init__(
        self,
        model,
        sites: Sites,
        enc: Encoder,
        dist: Distribution,
        base_ops: Sequence[str],
        alt_ops: Sequence[str],
        n: int,
        rng: random.Random,
        test: bool = False,
        variants: bool = True,
    ):
        pool = {op: dist.test_pool(op) if test else dist.train[op] for op in base_ops}
        bases = [dist.form(rng.choice(pool[rng.choice(list(base_ops))]), rng, variants) for _ in range(n)]
        vd_alts = [dist.vd_alternate(b, rng) for b in bases]
        oi_alts = [dist.oi_alternate(b, alt_ops, rng) for b in bases]
        self.n = n
        self.base_ids, self.base_attn = enc.prompts(bases)
        alt_ids, alt_attn = enc.prompts(vd_alts + oi_alts)
        # rows: the vd alternates, then the oi ones; trained through when training
        self.alt = record(model, sites, alt_ids, alt_attn, grad=torch.is_grad_enabled() and not test)
        self.base_digit = enc.first_digits(bases)
        self.vd_digit = enc.first_digits(vd_alts)
        self.oi_digit = enc.first_digits(oi_alts)

    def logits(
        self, model, sites: Sites, circuit_mask: torch.Tensor, strict_mask: torch.Tensor, strict: bool
    ) -> Dict[str, torch.Tensor]:
        """Patched logits (B, V): circuit from the vd alternates, from the oi ones, the rest from the vd ones."""
        ids, attn = self.base_ids.repeat(2, 1), self.base_attn.repeat(2, 1)
        both = patched_logits(model, sites, circuit_mask, ids, attn, self.alt)
        out = {"vd": both[: self.n], "oi": both[self.n :]}
        if strict:
            vd_alt = rows(self.alt, slice(0, self.n))
            out["strict"] = patched_logits(model, sites, strict_mask, self.base_ids, self.base_attn, vd_alt)
        return out

    def targets(self) -> Dict[str, torch.Tensor]:
        """The first digit each patched run should give. (B,)"""
        return {"vd": self.vd_digit, "oi": self.base_digit, "strict": self.base_digit}

    def informative(self) -> Dict[str, torch.Tensor]:
        """Pairs whose alternate starts with another digit: the others are right even unpatched. (B,) bool"""
        moved = self.vd_digit != self.base_digit
        return {"vd": moved, "oi": self.oi_digit != self.base_digit, "strict": moved}


def lr_at(step: int, o: DictConfig) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    progress = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * 0.5 * (1 + math.cos(math.pi * progress))


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
def evaluate(model, sites: Sites, enc: Encoder, dist: Distribution, cfg: DictConfig) -> Dict[str, Dict]:
    """Held-out exact match per operation and prompt form; interchange accuracy per operation."""
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
    circuit_mask, strict_mask = plant_masks(cfg.iit.circuit, sites.layout)
    alt_ops = list(cfg.iit.ops) or dist.ops
    interchange: Dict[str, Dict[str, float]] = {"vd": {}, "oi": {}, "strict": {}}
    for op in dist.ops:
        pairs = Interchange(model, sites, enc, dist, [op], alt_ops, cfg.n_eval, rng, test=True)
        logits = pairs.logits(model, sites, circuit_mask, strict_mask, strict=True)
        for name, target in pairs.targets().items():
            keep = pairs.informative()[name]
            hit = logits[name].argmax(-1) == target
            interchange[name][op] = hit[keep].float().mean().item() if keep.any() else float("nan")
    problems = [dist.form(rng.choice(dist.test_pool(rng.choice(dist.ops))), rng) for _ in range(cfg.n_eval)]
    layout = sites.layout
    heads = [(layer, h) for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    attention = {}  # source -> head -> part -> share of attention
    for source in SOURCES:
        shares = attention_shares(model, enc, problems, heads, source)  # (heads, parts)
        names = [f"L{layer}.H{h}" for layer, h in heads]
        attention[source] = {n: dict(zip(PARTS, map(float, row))) for n, row in zip(names, shares)}
    model.train(was_training)
    return {"accuracy": accuracy, "interchange": interchange, "attention": attention}


def train_organism(cfg: DictConfig) -> tuple[LlamaForCausalLM, object, Dict]:
    """Train the organism from scratch. Returns the model, its tokenizer and the result record."""
    dist = validate(cfg)
    o, iit = cfg.optim, cfg.iit
    tokenizer = build_char_tokenizer()
    model = build_model(cfg.model, tokenizer, cfg.seed)
    sites = locate_components(model)
    circuit_mask, strict_mask = plant_masks(iit.circuit, sites.layout)
    enc = Encoder(tokenizer, dist.template)
    rng = random.Random(f"train/{cfg.seed}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(0.9, 0.98),
    )
    weights = {"vd": iit.vd, "oi": iit.oi, "strict": iit.strict}
    history: List[Dict[str, float]] = []
    running: Dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(o.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o)
        variants = step >= cfg.dataset.variants_start
        losses = {"lm": lm_loss(model, *enc.with_answers([dist.sample(rng, variants) for _ in range(o.batch_size)]))}
        ramp = min(1.0, (step - iit.start + 1) / iit.ramp) if iit.ramp else 1.0
        if step >= iit.start and iit.ops and (iit.vd or iit.oi or iit.strict):
            pairs = Interchange(model, sites, enc, dist, iit.ops, iit.ops, iit.batch_size, rng, variants=variants)
            logits = pairs.logits(model, sites, circuit_mask, strict_mask, strict=iit.strict > 0)
            for name, target in pairs.targets().items():
                if name in logits and weights[name] > 0:
                    losses[name] = F.cross_entropy(logits[name], target)
        total = losses["lm"] + ramp * sum(weights[k] * v for k, v in losses.items() if k != "lm")
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == o.steps:
            n = cfg.log_every if (step + 1) % cfg.log_every == 0 else (step + 1) % cfg.log_every
            row = {"step": step + 1, "seconds": round(time.perf_counter() - t0, 1)} | {
                k: v / n for k, v in running.items()
            }
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row |= heldout_check(model, enc, dist, random.Random(f"check/{cfg.seed}"))
            history.append(row)
            running = {}
            if cfg.progress:
                log.info("step %d  %s", step + 1, "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
    train_seconds = time.perf_counter() - t0
    result = evaluate(model, sites, enc, dist, cfg) | {
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "history": history,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    model.eval()
    return model, tokenizer, result
