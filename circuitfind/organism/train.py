"""Training the organism: the answer's next-token loss plus interchange-intervention losses.

The interchange losses (organism/interchange.py) plant a known circuit (`iit.circuit`) at one
position (`iit.position`: the final token, or the query's x), with the same hooks and fixed 0/1
masks that DBM later uses to find it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaForCausalLM

from circuitfind.errors import CircuitfindError
from circuitfind.model.builtin import build_char_tokenizer, llama_config
from circuitfind.model.components import locate_components
from circuitfind.model.space import ComponentSpace
from circuitfind.organism.data import Distribution, Encoder
from circuitfind.organism.evaluate import evaluate, heldout_check
from circuitfind.organism.interchange import (
    ALONE_POSITIONS,
    POSITIONS,
    Interchange,
    Organism,
    plant_masks,
)
from circuitfind.organism.problems import OPERATIONS, check_template, task_space, variants_from_config
from circuitfind.task.encoding import position_ids

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
        (o.steps >= 1, f"optim.steps={o.steps}; give at least 1 training step"),
        (o.batch_size >= 1, f"optim.batch_size={o.batch_size}; give at least 1 prompt per batch"),
        (iit.batch_size >= 1, f"iit.batch_size={iit.batch_size}; give at least 1 interchange pair per batch"),
        (
            iit.start >= 0 and iit.ramp >= 0,
            f"iit.start={iit.start} and iit.ramp={iit.ramp} are step counts; give values >= 0",
        ),
        (o.lr > 0, f"optim.lr={o.lr}; the learning rate must be > 0"),
        (
            min(iit.vd, iit.oi, iit.strict, iit.alone) >= 0,
            "iit.vd, iit.oi, iit.strict and iit.alone are loss weights; give values >= 0",
        ),
        (iit.position in POSITIONS, f"iit.position={iit.position!r} is unknown; choose from {list(POSITIONS)}"),
        (
            not iit.alone or set(iit.alone_positions) <= set(ALONE_POSITIONS) - {iit.position},
            f"iit.alone_positions={list(iit.alone_positions)}; choose from "
            f"{[p for p in ALONE_POSITIONS if p != iit.position]} (not the circuit's own position)",
        ),
        (
            1 <= iit.alone_units <= m.n_layers * (m.n_heads + 1),
            f"iit.alone_units={iit.alone_units}; give 1 to {m.n_layers * (m.n_heads + 1)} (the units at a position)",
        ),
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
    plant_masks(iit.circuit, ComponentSpace(m.n_layers, m.n_heads, m.hidden // m.n_heads))  # names it checks
    dist = Distribution.split(space, d, cfg.seed)
    for op, problems in dist.train.items():
        if not problems or (d.heldout.get(op, 0) > 0 and not dist.heldout[op]):
            raise CircuitfindError(
                f"dataset.ranges.{op} has too few problems to hold out {d.heldout.get(op, 0):.0%}; widen it"
            )
    return dist


def build_model(m: DictConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A fresh organism (multi-head attention: one key/value head per head) with seeded weights."""
    config = llama_config(tokenizer, m.n_layers, m.n_heads, m.n_heads, m.hidden, m.intermediate, m.max_positions)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def initial_model(cfg: DictConfig, tokenizer) -> LlamaForCausalLM:
    """Seeded random weights, or the trained ones `init` names (a shipped asset or a checkpoint directory),
    which must have the shape `model` asks for."""
    if not cfg.init:
        return build_model(cfg.model, tokenizer, cfg.seed)
    from circuitfind.model.checkpoint import checkpoint_dir, load_checkpoint

    model, loaded_tokenizer = load_checkpoint(str(checkpoint_dir(cfg.init)))
    if loaded_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise CircuitfindError(f"init={cfg.init} has another tokenizer than the organism's; start from an organism")
    m, c = cfg.model, model.config
    have = (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.intermediate_size)
    want = (m.n_layers, m.n_heads, m.hidden, m.intermediate)
    if have != want:
        raise CircuitfindError(
            f"init={cfg.init} has (layers, heads, hidden, intermediate) {have}, the config {want}; "
            "set model.* to the checkpoint's shape"
        )
    return model


def init_chain(init: str | None) -> List[Dict]:
    """The trainings `init` came from, first first: each one's command and minutes (its organism.json)."""
    if not init:
        return []
    from circuitfind.model.checkpoint import checkpoint_dir

    record_file = checkpoint_dir(init) / "organism.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    step = {"from": init, "command": record.get("command"), "train_seconds": record.get("train_seconds")}
    return [*record.get("init_chain", []), step]


def lm_loss(model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens (labels != -100). ids, attn, labels (B, T)"""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def lr_at(step: int, o: DictConfig) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    progress = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_organism(cfg: DictConfig) -> tuple[LlamaForCausalLM, object, Dict]:
    """Train the organism, from scratch or from `init`. Returns the model, its tokenizer and the result record."""
    dist = validate(cfg)
    o, iit = cfg.optim, cfg.iit
    tokenizer = build_char_tokenizer()
    model = initial_model(cfg, tokenizer)
    org = Organism(model, locate_components(model), Encoder(tokenizer, dist.template), dist, iit.position)
    circuit_mask, strict_mask = plant_masks(iit.circuit, org.sites.space)
    rng = random.Random(f"train/{cfg.seed}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(0.9, 0.98),
    )
    weights = {"vd": iit.vd, "oi": iit.oi, "strict": iit.strict, "alone": iit.alone}
    units = list(org.sites.space.units())
    history: List[Dict[str, float]] = []
    running: Dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(o.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o)
        variants = step >= cfg.dataset.variants_start
        batch = org.enc.with_answers([dist.sample(rng, variants) for _ in range(o.batch_size)])
        losses = {"lm": lm_loss(model, *batch)}
        ramp = min(1.0, (step - iit.start + 1) / iit.ramp) if iit.ramp else 1.0
        if step >= iit.start and iit.ops and (iit.vd or iit.oi or iit.strict or iit.alone):
            pairs = Interchange(org, iit.ops, iit.ops, iit.batch_size, rng, variants=variants)
            logits = pairs.logits(org, circuit_mask, strict_mask, strict=iit.strict > 0)
            if iit.alone:  # a fresh draw of units per position and step
                logits["alone"] = torch.cat(
                    [
                        pairs.alone_logits(org, position, rng.sample(units, iit.alone_units))
                        for position in iit.alone_positions
                    ]
                )
            for name, target in pairs.targets().items():
                if name in logits and weights[name] > 0:
                    n_copies = logits[name].shape[0] // target.shape[0]
                    losses[name] = F.cross_entropy(logits[name], target.repeat(n_copies))
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
                row |= heldout_check(model, org.enc, dist, random.Random(f"check/{cfg.seed}"))
            history.append(row)
            running = {}
            if cfg.progress:
                log.info("step %d  %s", step + 1, "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"))
    train_seconds = time.perf_counter() - t0
    result = evaluate(org, cfg) | {
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "history": history,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "init_chain": init_chain(cfg.init),
    }
    model.eval()
    return model, tokenizer, result
