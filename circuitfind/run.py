"""One `circuitfind train` job: data, model, mask training, evaluation, outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

import circuitfind
from circuitfind import plots
from circuitfind.components import ComponentLayout, locate_components
from circuitfind.data import Pair, check_template, make_pairs, task_space, variants_from_config
from circuitfind.desiderata import Desideratum, get_desideratum
from circuitfind.engine import FullEngine, Readout, make_engine
from circuitfind.errors import CircuitfindError
from circuitfind.evaluate import EvalSplit, baseline_metrics, evaluate_masks, prepare_split
from circuitfind.models import load_model
from circuitfind.outputs import write_json, write_tensors
from circuitfind.tokens import PairEncoder
from circuitfind.tracking import Tracker
from circuitfind.train_loop import NonFiniteLoss, Objective, round_mask, train_mask, unpatched_logit_diff

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    """Reject impossible settings before anything is loaded or written."""
    if cfg.desiderata is None:
        raise CircuitfindError(
            f"no desiderata chosen; add +desiderata=<name>, one of: {', '.join(available_desiderata())}"
        )
    o, d = cfg.optimizer, cfg.dataset
    checks = [
        (o.lam >= 0, f"optimizer.lam={o.lam} is negative; the sparsity weight must be >= 0"),
        (o.steps >= 1, f"optimizer.steps={o.steps}; give at least 1 iteration"),
        (o.lr > 0, f"optimizer.lr={o.lr}; the learning rate must be > 0"),
        (o.eps > 0, f"optimizer.eps={o.eps}; must be > 0 (the l0.5 penalty's gradient is infinite at w = 1 otherwise)"),
        (o.batch_size is None or o.batch_size >= 1, f"optimizer.batch_size={o.batch_size}; give >= 1 or null"),
        (o.eval_every >= 1, f"optimizer.eval_every={o.eval_every}; give >= 1"),
        (d.n_train >= 1 and d.n_test >= 1, "dataset.n_train and dataset.n_test must be >= 1"),
        (d.n_transfer >= 0, "dataset.n_transfer must be >= 0"),
        (len(d.train_ops) >= 1, "dataset.train_ops is empty; give at least one operation, e.g. [add, sub]"),
        (len(cfg.desiderata.terms) >= 1, "desiderata.terms is empty; list at least one desideratum"),
        (0 <= cfg.min_baseline_acc <= 1, f"min_baseline_acc={cfg.min_baseline_acc} must lie in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise CircuitfindError(message)
    check_template(d.template)


def available_desiderata() -> List[str]:
    folder = Path(__file__).parent / "configs" / "desiderata"
    return sorted(p.stem for p in folder.glob("*.yaml"))


@dataclass
class DesideratumData:
    """Every split of one desideratum's pairs."""

    desideratum: Desideratum
    train: List[Pair]
    test: List[Pair]
    transfer: List[Pair]


def build_data(cfg: DictConfig) -> Dict[str, DesideratumData]:
    """Train, held-out and transfer pairs for every desideratum trained or evaluated."""
    d = cfg.dataset
    space = task_space(d.ranges, list(d.train_ops) + list(d.transfer_ops), alt_ops=list(d.train_ops),
                       variants=variants_from_config(d.variants))
    names = list(dict.fromkeys([t.name for t in cfg.desiderata.terms] + list(cfg.desiderata.evaluate)))
    data = {}
    for name in names:
        des = get_desideratum(name)
        rng = random.Random(f"{cfg.seed}/{name}")  # independent of which other desiderata run
        train, test = make_pairs(des.alternates, space, d.train_ops, [d.n_train, d.n_test], rng, f"{name} pairs")
        transfer: List[Pair] = []
        if d.transfer_ops and d.n_transfer:
            (transfer,) = make_pairs(des.alternates, space, d.transfer_ops, [d.n_transfer], rng, f"{name} transfer pairs")
        data[name] = DesideratumData(des, train, test, transfer)
    return data


def data_fingerprint(data: Dict[str, DesideratumData], template: str) -> str:
    """A short hash of every prompt pair, so two runs can be checked to share data."""
    blob = json.dumps(
        {n: [[repr(p) for p in split] for split in (v.train, v.test, v.transfer)] for n, v in data.items()}
        | {"template": template}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def circuit_table(mask: torch.Tensor, rounded: torch.Tensor, layout: ComponentLayout) -> List[Dict[str, Any]]:
    """The patched components (rounded w = 0), weakest weight first. mask (L, H+1)"""
    rows = []
    for (layer, col), name in zip(
        ((layer, col) for layer in range(layout.n_layers) for col in range(layout.n_heads + 1)), layout.names()
    ):
        if rounded[layer, col] == 0:
            kind = "mlp" if col == layout.n_heads else "head"
            rows.append(
                {"name": name, "kind": kind, "layer": layer, "head": None if kind == "mlp" else col,
                 "weight": round(float(mask[layer, col]), 6)}
            )
    return sorted(rows, key=lambda r: (r["weight"], r["layer"], r["name"]))


class Job:
    """Everything one run needs, built once: model, engine, prepared splits."""

    def __init__(self, cfg: DictConfig):
        validate(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg)
        self.model, self.tokenizer = load_model(cfg.model)
        self.sites = locate_components(self.model)
        self.layout = self.sites.layout
        self.engine: FullEngine = make_engine(cfg.engine, self.model, self.sites)
        self.readout = Readout(self.model)
        self.encoder = PairEncoder(self.tokenizer, cfg.dataset.template)
        self.device = torch.device(cfg.model.device)

    def prepared(self, pairs: List[Pair]):
        enc = self.encoder.encode(pairs)
        return [self.engine.prepare(chunk) for chunk in enc.chunks(self.cfg.optimizer.batch_size)]

    def objectives(self) -> List[Objective]:
        objs = []
        for term in self.cfg.desiderata.terms:
            dd = self.data[term.name]
            batches = self.prepared(dd.train)
            d0 = [unpatched_logit_diff(self.engine, self.readout, b) for b in batches]
            objs.append(Objective(dd.desideratum, batches, d0, term.weight, term.with_sparsity))
        return objs

    def eval_splits(self) -> List[EvalSplit]:
        splits = []
        for name, dd in self.data.items():
            for split_name, pairs in (("test", dd.test), ("transfer", dd.transfer)):
                if pairs:
                    splits.append(prepare_split(f"{name}_{split_name}", dd.desideratum, self.prepared(pairs), self.engine, self.readout))
        return splits


def evaluate_all(job: Job, splits: List[EvalSplit], mask: torch.Tensor, only_test: bool = False) -> Dict[str, torch.Tensor]:
    out = {}
    for split in splits:
        if only_test and not split.name.endswith("_test"):
            continue
        for key, value in evaluate_masks(split, job.engine, job.readout, mask).items():
            out[f"{split.name}/{key}"] = value
    return out


def check_baseline(cfg: DictConfig, baseline: Dict[str, float]) -> List[str]:
    """Warn (or, with strict=true, stop) when the unpatched model cannot do the task."""
    warnings = []
    for key, value in baseline.items():
        if key.endswith("/task_acc") and key.split("/")[0].endswith("_test") and value < cfg.min_baseline_acc:
            message = (
                f"the unpatched model answers only {value:.0%} of {key.split('/')[0]} prompts correctly "
                f"(min_baseline_acc={cfg.min_baseline_acc}); accuracies against arithmetic answers are not "
                "trustworthy; read the acc_model metrics, or use a model that can do the task"
            )
            if cfg.strict:
                raise CircuitfindError(message + " (strict=true)")
            log.warning(message)
            warnings.append(message)
    return warnings


def run_training(cfg: DictConfig, run_dir: Path, job_name: str = "train", group: str | None = None) -> Dict[str, Any]:
    """Run one mask search and write its outputs into `run_dir`. Returns the final metrics."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    job = Job(cfg)
    splits = job.eval_splits()
    objectives = job.objectives()
    baseline = {f"{s.name}/{k}": v for s in splits for k, v in baseline_metrics(s).items()}
    warnings = check_baseline(cfg, baseline)

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(run_dir, cfg.logger, config_dict, name=run_dir.name, group=group)
    history: List[Dict[str, float]] = []
    lams = torch.tensor([cfg.optimizer.lam], dtype=torch.float32, device=job.device)

    def on_step(step: int, mask: torch.Tensor, logs: Dict[str, torch.Tensor]) -> None:
        row = {k: float(v[0]) for k, v in logs.items()}
        if (step + 1) % cfg.optimizer.eval_every == 0 or step + 1 == cfg.optimizer.steps:
            with torch.no_grad():
                evals = evaluate_all(job, splits, round_mask(mask), only_test=True)
            row |= {k: float(v[0]) for k, v in evals.items() if k.endswith("/acc")}
        tracker.log(row, step)
        history.append({"step": step, **row})

    failed = True
    try:
        t_train = time.perf_counter()
        try:
            mask = train_mask(job.engine, job.readout, objectives, lams, job.layout.shape, cfg.optimizer.lr,
                              cfg.optimizer.steps, cfg.optimizer.eps, on_step, progress=cfg.progress)
        except NonFiniteLoss as e:
            write_tensors(run_dir / "mask_last_good.safetensors", {"continuous": e.last_good[0]},
                          {"names": json.dumps(job.layout.names())})
            raise
        train_s = time.perf_counter() - t_train
        rounded = round_mask(mask)
        with torch.no_grad():
            final = {k: float(v[0]) for k, v in evaluate_all(job, splits, rounded).items()}
            final |= {f"continuous/{k}": float(v[0]) for k, v in evaluate_all(job, splits, mask, only_test=True).items() if k.endswith("/acc")}
        result = write_outputs(cfg, job, run_dir, mask[0], rounded[0], final, baseline, history, warnings, tracker,
                               {"train_s": round(train_s, 3), "total_s": round(time.perf_counter() - t_start, 3)})
        failed = False
        return result
    finally:
        tracker.close(failed=failed)


def write_outputs(cfg, job: Job, run_dir: Path, mask, rounded, final, baseline, history, warnings, tracker, timing) -> Dict[str, Any]:
    """mask.safetensors, plots, then circuit.json last: its presence marks a finished run."""
    layout = job.layout
    names = layout.names()
    write_tensors(run_dir / "mask.safetensors", {"continuous": mask, "rounded": rounded}, {"names": json.dumps(names)})
    circuit = circuit_table(mask, rounded, layout)
    n_patched = len(circuit)
    summary = {"n_patched": n_patched, "fraction_patched": n_patched / layout.n_components, **final}
    tracker.summary(summary | {f"baseline/{k}": v for k, v in baseline.items()})
    tracker.table("circuit", ["name", "kind", "layer", "head", "weight"], [list(r.values()) for r in circuit])
    if cfg.plots:
        plots.mask_heatmap(mask.cpu().numpy(), run_dir / "mask_heatmap.png",
                           f"{n_patched} of {layout.n_components} components patched (λ={cfg.optimizer.lam:g})")
        plots.training_curves(history, run_dir / "curves.png")
        tracker.image("mask_heatmap", run_dir / "mask_heatmap.png")
        tracker.image("curves", run_dir / "curves.png")
    result = {
        "status": "complete",
        "circuit": circuit,
        "n_patched": n_patched,
        "n_components": layout.n_components,
        "fraction_patched": n_patched / layout.n_components,
        "lam": cfg.optimizer.lam,
        "metrics": final,
        "baseline": baseline,
        "warnings": warnings,
        "model": {
            "kind": cfg.model.kind,
            "name_or_path": cfg.model.name_or_path,
            "model_type": job.model.config.model_type,
            "n_layers": layout.n_layers,
            "n_heads": layout.n_heads,
            "dtype": cfg.model.dtype,
            "device": cfg.model.device,
        },
        "data": {
            "fingerprint": data_fingerprint(job.data, cfg.dataset.template),
            "template": cfg.dataset.template,
            "train_ops": list(cfg.dataset.train_ops),
            "transfer_ops": list(cfg.dataset.transfer_ops),
            "sizes": {n: {"train": len(v.train), "test": len(v.test), "transfer": len(v.transfer)} for n, v in job.data.items()},
            "seed": cfg.seed,
        },
        "desiderata": OmegaConf.to_container(cfg.desiderata, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "timing": timing,
        "versions": {"circuitfind": circuitfind.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_json(run_dir / "circuit.json", result)
    return result
