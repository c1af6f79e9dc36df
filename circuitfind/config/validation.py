"""Checking a `circuitfind train` config before anything is loaded or written."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig, OmegaConf

from circuitfind.config.choices import (
    ABLATIONS,
    BACKENDS,
    CACHE_POLICIES,
    ENGINES,
    GATES,
    METHODS,
    PRUNE_CRITERIA,
    RANKING_METHODS,
    SEARCH_METHODS,
    UNIT_KINDS,
    WANDB_MODES,
    shipped,
)
from circuitfind.config.schema import wants_evidence
from circuitfind.errors import CircuitfindError

log = logging.getLogger(__name__)


ESCAPES = {"\\n": "\n", "\\t": "\t"}  # as typed on a command line -> the characters meant


def normalised(cfg: DictConfig) -> DictConfig:
    """The config a run uses: the task's own desiderata when none were chosen, and escapes read."""
    if cfg.desiderata is None and cfg.task.desiderata is not None:
        cfg = OmegaConf.merge(cfg, {"desiderata": cfg.task.desiderata})
    return interpret_escapes(cfg)


def interpret_escapes(cfg: DictConfig) -> DictConfig:
    """The config with a backslash-n or backslash-t typed into task.template (a shell passes them
    literally) read as the newline or tab it stands for; the same config when there is none."""
    template = cfg.task.template
    fixed = template
    for typed, meant in ESCAPES.items():
        fixed = fixed.replace(typed, meant)
    if fixed == template:
        return cfg
    log.info(f"task.template: read the escapes in {template!r} as {fixed!r}")
    out = OmegaConf.merge(cfg, {"task": {"template": fixed}})
    OmegaConf.set_struct(out, OmegaConf.is_struct(cfg))
    return out


def validate(cfg: DictConfig) -> None:
    """Reject impossible settings with one line naming the key and the fix."""
    if cfg.desiderata is None:
        raise CircuitfindError(
            f"task {cfg.task.name} names no desiderata and none were chosen; add +desiderata=<name>, "
            f"one of: {', '.join(shipped('desiderata'))}"
        )
    o, d, m, e, lg, ev = cfg.optimizer, cfg.task, cfg.method, cfg.evidence, cfg.logger, cfg.evaluate
    lams = list(o.lams or [])
    not_finite = [
        (key, value)
        for key, value in [("optimizer.lam", o.lam), ("optimizer.lr", o.lr), ("optimizer.eps", o.eps),
                           ("prune.tolerance", cfg.prune.tolerance), ("min_baseline_acc", cfg.min_baseline_acc)]
        + [(f"optimizer.lams[{i}]", v) for i, v in enumerate(lams)]
        + [(f"optimizer.temperature[{i}]", v) for i, v in enumerate(o.temperature)]
        + [(f"optimizer.target_range[{i}]", v) for i, v in enumerate(o.target_range)]
        if not math.isfinite(value)
    ]  # fmt: skip
    if not_finite:
        key, value = not_finite[0]
        raise CircuitfindError(f"{key}={value} is not a finite number; give a finite value")
    checks = [
        (lg.backend in BACKENDS, f"logger.backend={lg.backend!r} is unknown; use logger=wandb or logger=none"),
        (lg.mode in WANDB_MODES, f"logger.mode={lg.mode!r} is unknown; choose from {list(WANDB_MODES)}"),
        (o.lam >= 0, f"optimizer.lam={o.lam} is negative; the sparsity weight must be >= 0"),
        (all(v >= 0 for v in lams), f"optimizer.lams={lams} has a negative lambda; give values >= 0"),
        (len(set(lams)) == len(lams), f"optimizer.lams={lams} repeats a value"),
        (cfg.engine in ENGINES, f"engine={cfg.engine!r} is unknown; choose from {sorted(ENGINES)}"),
        (cfg.cache in CACHE_POLICIES, f"cache={cfg.cache!r} is unknown; choose from {list(CACHE_POLICIES)}"),
        (o.steps >= 1, f"optimizer.steps={o.steps}; give at least 1 iteration"),
        (o.lr > 0, f"optimizer.lr={o.lr}; the learning rate must be > 0"),
        (o.eps > 0, f"optimizer.eps={o.eps}; must be > 0 (the l0.5 penalty's gradient is infinite at w = 1 otherwise)"),
        (o.batch_size is None or o.batch_size >= 1, f"optimizer.batch_size={o.batch_size}; give >= 1 or null"),
        (o.eval_every >= 1, f"optimizer.eval_every={o.eval_every}; give >= 1"),
        (d.n_train >= 1 and d.n_test >= 1, "task.n_train and task.n_test must be >= 1"),
        (d.n_transfer >= 0 and d.n_validation >= 0, "task.n_transfer and task.n_validation must be >= 0"),
        (
            any(t.train for t in cfg.desiderata.terms),
            "desiderata.terms trains no desideratum; list at least one without train: false",
        ),
        (0 <= cfg.min_baseline_acc <= 1, f"min_baseline_acc={cfg.min_baseline_acc} must lie in [0, 1]"),
        (m.name in METHODS, f"method={m.name!r} is unknown; choose from {METHODS}"),
        (
            m.name in SEARCH_METHODS or (m.k or 0) >= 1,
            f"method={m.name} needs a circuit size: method.k=<n> with n >= 1",
        ),
        (m.name in SEARCH_METHODS or not lams, f"optimizer.lams applies to method={next(iter(SEARCH_METHODS))} only"),
        (
            all(b in RANKING_METHODS for b in e.baselines),
            f"evidence.baselines={list(e.baselines)} has an unknown method; choose from {list(RANKING_METHODS)}",
        ),
        (
            not wants_evidence(e) or (m.name in SEARCH_METHODS and not lams),
            "evidence=... needs method=dbm with a single optimizer.lam",
        ),
        (
            e.stability_seeds >= 0 and e.random_draws >= 1,
            "evidence.stability_seeds must be >= 0 and evidence.random_draws >= 1",
        ),
    ]
    checks += [
        (
            all(k in ABLATIONS for k in ev.ablations),
            f"evaluate.ablations={list(ev.ablations)} has an unknown kind; choose from {list(ABLATIONS)}",
        ),
        (ev.min_reference >= 2, f"evaluate.min_reference={ev.min_reference}; a mean needs at least 2 prompts"),
        (0 <= ev.min_share < 1, f"evaluate.min_share={ev.min_share} must lie in [0, 1)"),
    ]
    u = cfg.units
    checks += [
        (u.kind in UNIT_KINDS, f"units.kind={u.kind!r} is unknown; choose from {', '.join(UNIT_KINDS)} (units=<kind>)"),
        (u.group_size >= 1, f"units.group_size={u.group_size}; give >= 1 (1 = single neurons)"),
        (u.kind == "neurons" or u.group_size == 1, "units.group_size applies to units=neurons only"),
        (u.memory_gb is None or u.memory_gb > 0, f"units.memory_gb={u.memory_gb}; give a positive size or null"),
    ]
    checks += [
        (
            cfg.model.kind != "tracr" or cfg.model.dtype == "float32",
            f"model=tracr runs in float32 only, not model.dtype={cfg.model.dtype}: its compiled weights are exact, "
            "and rounding them can change its answers (frac_prevs in bfloat16: 2.2% of them); drop model.dtype",
        ),
    ]
    pr = cfg.prune
    checks += [
        (o.gate in GATES, f"optimizer.gate={o.gate!r} is unknown; choose from {list(GATES)}"),
        (
            len(o.temperature) == 2 and 0 < o.temperature[1] <= o.temperature[0],
            f"optimizer.temperature={list(o.temperature)}; give [start, end] with start >= end > 0",
        ),
        (
            0 <= pr.tolerance <= 1,
            f"prune.tolerance={pr.tolerance} must lie in [0, 1]: the share of the circuit's improvement "
            "pruning may give up (0: keep every unit that helps; 0.01 is the default)",
        ),
        (
            pr.criterion in PRUNE_CRITERIA,
            f"prune.criterion={pr.criterion!r} is unknown; choose from {list(PRUNE_CRITERIA)}",
        ),
        (pr.min_pairs >= 1, f"prune.min_pairs={pr.min_pairs}; give >= 1"),
        (
            pr.screen_pairs is None or pr.screen_pairs >= pr.min_pairs,
            f"prune.screen_pairs={pr.screen_pairs} is too few pairs to judge a circuit on; give "
            f"prune.screen_pairs >= prune.min_pairs ({pr.min_pairs}), or null to score every pair",
        ),
        (
            not pr.enabled or d.n_validation >= pr.min_pairs,
            f"task.n_validation={d.n_validation} is too few pairs to prune on (prune.min_pairs={pr.min_pairs}); "
            f"give task.n_validation >= {pr.min_pairs}, or prune=none to keep the rounded mask",
        ),
    ]
    t = o.target_range
    checks += [
        (
            o.target_size is None or (m.name in SEARCH_METHODS and not lams),
            "optimizer.target_size needs method=dbm and no optimizer.lams: the search chooses the lambda",
        ),
        (o.target_size is None or o.target_size >= 0, f"optimizer.target_size={o.target_size}; give a size >= 0"),
        (
            len(t) == 2 and 0 < t[0] < t[1],
            f"optimizer.target_range={list(t)}; give [low, high] with 0 < low < high",
        ),
        (o.target_lams >= 2 and o.target_rounds >= 1, "optimizer.target_lams must be >= 2 and target_rounds >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise CircuitfindError(message)
