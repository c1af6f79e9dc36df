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
from circuitfind.attention import final_position_attention
from circuitfind.components import ComponentLayout, locate_components
from circuitfind.data import Pair, check_template, make_pairs, task_space, variants_from_config
from circuitfind.desiderata import Desideratum, get_desideratum
from circuitfind.engine import CACHE_POLICIES, ENGINES, FullEngine, Readout, make_engine
from circuitfind.errors import CircuitfindError
from circuitfind.evaluate import EvalSplit, baseline_metrics, evaluate_masks, prepare_split
from circuitfind.evidence import compare_methods, component_scores, run_stability
from circuitfind.export import export_circuit, transformerlens_hook
from circuitfind.methods import BASELINES, METHODS, top_k_mask
from circuitfind.models import load_model
from circuitfind.outputs import write_json, write_tensors, write_text
from circuitfind.sweep import write_summary
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
        (
            all(v >= 0 for v in o.lams or []),
            f"optimizer.lams={list(o.lams or [])} has a negative lambda; give values >= 0",
        ),
        (len(set(o.lams or [])) == len(o.lams or []), f"optimizer.lams={list(o.lams or [])} repeats a value"),
        (cfg.engine in ENGINES, f"engine={cfg.engine!r} is unknown; choose from {sorted(ENGINES)}"),
        (cfg.cache in CACHE_POLICIES, f"cache={cfg.cache!r} is unknown; choose from {list(CACHE_POLICIES)}"),
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
        (cfg.method.name in METHODS, f"method={cfg.method.name!r} is unknown; choose from {METHODS}"),
        (
            cfg.method.name == "dbm" or (cfg.method.k or 0) >= 1,
            f"method={cfg.method.name} needs a circuit size: method.k=<n> with n >= 1",
        ),
        (cfg.method.name == "dbm" or not o.lams, "optimizer.lams applies to method=dbm only"),
        (
            all(b in BASELINES for b in cfg.evidence.baselines),
            f"evidence.baselines={list(cfg.evidence.baselines)} has an unknown method; choose from {BASELINES}",
        ),
        (
            not wants_evidence(cfg) or (cfg.method.name == "dbm" and not o.lams),
            "evidence=... needs method=dbm with a single optimizer.lam",
        ),
        (
            cfg.evidence.stability_seeds >= 0 and cfg.evidence.random_draws >= 1,
            "evidence.stability_seeds must be >= 0 and evidence.random_draws >= 1",
        ),
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
    space = task_space(
        d.ranges,
        list(d.train_ops) + list(d.transfer_ops),
        alt_ops=list(d.train_ops),
        variants=variants_from_config(d.variants),
    )
    names = list(dict.fromkeys([t.name for t in cfg.desiderata.terms] + list(cfg.desiderata.evaluate)))
    data = {}
    for name in names:
        des = get_desideratum(name)
        rng = random.Random(f"{cfg.seed}/{name}")  # independent of which other desiderata run
        train, test = make_pairs(des.alternates, space, d.train_ops, [d.n_train, d.n_test], rng, f"{name} pairs")
        transfer: List[Pair] = []
        if d.transfer_ops and d.n_transfer:
            (transfer,) = make_pairs(
                des.alternates, space, d.transfer_ops, [d.n_transfer], rng, f"{name} transfer pairs"
            )
        data[name] = DesideratumData(des, train, test, transfer)
    return data


def data_fingerprint(data: Dict[str, DesideratumData], template: str) -> str:
    """A short hash of every prompt pair, so two runs can be checked to share data."""
    blob = json.dumps(
        {n: [[repr(p) for p in split] for split in (v.train, v.test, v.transfer)] for n, v in data.items()}
        | {"template": template}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


CIRCUIT_COLUMNS = ("name", "kind", "layer", "head", "weight", "transformerlens")


def circuit_table(mask: torch.Tensor, rounded: torch.Tensor, layout: ComponentLayout) -> List[Dict[str, Any]]:
    """The patched components (rounded w = 0), weakest weight first. mask (L, H+1)"""
    rows = []
    for (layer, col), name in zip(
        ((layer, col) for layer in range(layout.n_layers) for col in range(layout.n_heads + 1)), layout.names()
    ):
        if rounded[layer, col] == 0:
            kind = "mlp" if col == layout.n_heads else "head"
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "layer": layer,
                    "head": None if kind == "mlp" else col,
                    "weight": round(float(mask[layer, col]), 6),
                    "transformerlens": transformerlens_hook(layer, col, layout)["hook"],
                }
            )
    return sorted(rows, key=lambda r: (r["weight"], r["layer"], r["name"]))


class Job:
    """Everything one run needs, built once: model, engine, prepared splits."""

    def __init__(self, cfg: DictConfig, loaded: tuple | None = None):
        validate(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg)
        self.model, self.tokenizer = loaded or load_model(cfg.model)
        self.sites = locate_components(self.model)
        self.layout = self.sites.layout
        self.engine: FullEngine = make_engine(cfg.engine, self.model, self.sites, cfg.cache)
        self.readout = Readout(self.model)
        self.encoder = PairEncoder(self.tokenizer, cfg.dataset.template)
        self.device = torch.device(cfg.model.device)

    def prepared(self, pairs: List[Pair]):
        enc = self.encoder.encode(pairs)
        return [self.engine.prepare(chunk) for chunk in enc.chunks(self.cfg.optimizer.batch_size)]

    def objectives(self, split: str = "train") -> List[Objective]:
        """The training objective's terms on the `split` ("train" or held-out "test") pairs."""
        objs = []
        for term in self.cfg.desiderata.terms:
            dd = self.data[term.name]
            batches = self.prepared(getattr(dd, split))
            d0 = [unpatched_logit_diff(self.engine, self.readout, b) for b in batches]
            objs.append(Objective(dd.desideratum, batches, d0, term.weight, term.with_sparsity))
        return objs

    def eval_splits(self) -> List[EvalSplit]:
        splits = []
        for name, dd in self.data.items():
            for split_name, pairs in (("test", dd.test), ("transfer", dd.transfer)):
                if pairs:
                    splits.append(
                        prepare_split(
                            f"{name}_{split_name}", dd.desideratum, self.prepared(pairs), self.engine, self.readout
                        )
                    )
        return splits


def evaluate_all(
    job: Job, splits: List[EvalSplit], mask: torch.Tensor, only_test: bool = False
) -> Dict[str, torch.Tensor]:
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


def find_masks(cfg: DictConfig, job: "Job", objectives, lams: List[float], on_step) -> torch.Tensor:
    """The K masks of this run: trained by DBM, or the top k of a baseline's ranking. (K, L, H+1)"""
    shape = job.layout.shape
    if cfg.method.name == "dbm":
        return train_mask(
            job.engine,
            job.readout,
            objectives,
            torch.tensor(lams, dtype=torch.float32, device=job.device),
            shape,
            cfg.optimizer.lr,
            cfg.optimizer.steps,
            cfg.optimizer.eps,
            on_step,
            progress=cfg.progress,
        )
    scores = component_scores(cfg.method.name, job.engine, job.readout, objectives, shape, job.device, cfg.seed)
    return top_k_mask(scores, cfg.method.k)[None]


def wants_evidence(cfg: DictConfig) -> bool:
    e = cfg.evidence
    return bool(e.baselines or e.curves or e.stability_seeds)


def gather_evidence(cfg: DictConfig, job: "Job", splits, objectives, mask: torch.Tensor) -> Dict[str, Any]:
    """Baselines at equal size, faithfulness curves and stability of the DBM circuit."""
    e = cfg.evidence
    evidence = compare_methods(
        mask,
        list(e.baselines),
        list(e.ks),
        e.random_draws,
        job.engine,
        job.readout,
        objectives,
        splits,
        cfg.seed,
        e.curves,
    )
    if e.stability_seeds:
        names = job.layout.names()
        main_circuit = [n for n, w in zip(names, mask.flatten().tolist()) if w < 0.5]

        def find_circuit(seed: int) -> List[str]:
            if seed == cfg.seed:
                return main_circuit
            other = Job(OmegaConf.merge(cfg, {"seed": seed}), loaded=(job.model, job.tokenizer))
            found = train_mask(
                other.engine,
                other.readout,
                other.objectives(),
                torch.tensor([cfg.optimizer.lam], device=job.device),
                other.layout.shape,
                cfg.optimizer.lr,
                cfg.optimizer.steps,
                cfg.optimizer.eps,
                progress=False,
            )
            return [n for n, w in zip(names, found[0].flatten().tolist()) if w < 0.5]

        seeds = [cfg.seed + i for i in range(e.stability_seeds)]
        evidence["stability"] = run_stability(seeds, find_circuit, names)
    return evidence


def write_evidence(run_dir: Path, evidence: Dict[str, Any], names: List[str], tracker: Tracker | None) -> None:
    write_json(run_dir / "evidence.json", evidence)
    if "curves" in evidence:
        plots.faithfulness_figure(evidence["curves"], run_dir / "faithfulness.png")
        if tracker is not None:
            tracker.image("faithfulness", run_dir / "faithfulness.png")
    if tracker is not None:
        rows = evidence["comparison"]
        keys = sorted({k for r in rows for k in r})
        tracker.table("baselines", keys, [[r.get(k) for k in keys] for r in rows])


def planted_scores(model: torch.nn.Module, found: List[str]) -> Dict[str, Any] | None:
    """Precision and recall of the found circuit against one planted in the model, if any."""
    meta = getattr(model.config, "circuitfind", None) or {}
    planted = meta.get("planted_circuit") if isinstance(meta, dict) else None
    if not planted:
        return None
    hits = len(set(found) & set(planted))
    return {
        "planted": list(planted),
        "precision": hits / len(found) if found else 0.0,
        "recall": hits / len(planted),
        "exact": set(found) == set(planted),
    }


def lambdas(cfg: DictConfig) -> List[float]:
    """The sparsity weights to train: optimizer.lams (K masks at once) or optimizer.lam."""
    return [float(v) for v in cfg.optimizer.lams] if cfg.optimizer.lams else [float(cfg.optimizer.lam)]


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_training(cfg: DictConfig, run_dir: Path, group: str | None = None) -> List[Dict[str, Any]]:
    """Run one mask search and write its outputs into `run_dir`. Returns one result per lambda.

    With optimizer.lams, K masks are trained side by side on the same batches; each gets
    its own result directory `lam=<value>/` and the run directory gets a sweep summary.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    job = Job(cfg)
    try:
        splits = job.eval_splits()
        objectives = job.objectives()
    except RuntimeError as e:
        if out_of_memory(e):
            raise CircuitfindError(
                "out of memory while preparing the batches; set optimizer.batch_size smaller "
                "(e.g. optimizer.batch_size=8) or cache=cpu / cache=recompute"
            ) from e
        raise
    baseline = {f"{s.name}/{k}": v for s in splits for k, v in baseline_metrics(s).items()}
    warnings = check_baseline(cfg, baseline)

    lams = lambdas(cfg)
    batched = bool(cfg.optimizer.lams)
    out_dirs = [run_dir / f"lam={lam:g}" for lam in lams] if batched else [run_dir]
    prefixes = [f"lam={lam:g}/" for lam in lams] if batched else [""]
    tracker = Tracker(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), name=run_dir.name, group=group)
    histories: List[List[Dict[str, float]]] = [[] for _ in lams]

    def on_step(step: int, mask: torch.Tensor, logs: Dict[str, torch.Tensor]) -> None:
        rows = [{key: float(v[k]) for key, v in logs.items()} for k in range(len(lams))]
        if (step + 1) % cfg.optimizer.eval_every == 0 or step + 1 == cfg.optimizer.steps:
            with torch.no_grad():
                evals = evaluate_all(job, splits, round_mask(mask), only_test=True)
            for k, row in enumerate(rows):
                row |= {key: float(v[k]) for key, v in evals.items() if key.endswith("/acc")}
        tracker.log({prefix + key: v for prefix, row in zip(prefixes, rows) for key, v in row.items()}, step)
        for history, row in zip(histories, rows):
            history.append({"step": step, **row})

    failed = True
    try:
        t_train = time.perf_counter()
        try:
            mask = find_masks(cfg, job, objectives, lams, on_step)
        except NonFiniteLoss as e:
            for k, out_dir in enumerate(out_dirs):
                write_tensors(
                    out_dir / "mask_last_good.safetensors",
                    {"continuous": e.last_good[k]},
                    {"names": json.dumps(job.layout.names())},
                )
            raise
        except RuntimeError as e:
            if out_of_memory(e):
                raise CircuitfindError(
                    "out of memory during mask training; set optimizer.batch_size smaller, "
                    "train fewer lambdas at once, or use cache=cpu"
                ) from e
            raise
        train_s = time.perf_counter() - t_train
        rounded = round_mask(mask)
        with torch.no_grad():
            final = evaluate_all(job, splits, rounded)
            continuous = {
                k: v for k, v in evaluate_all(job, splits, mask, only_test=True).items() if k.endswith("/acc")
            }
        timing = {
            "train_s": round(train_s, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "train_s_per_step": round(train_s / cfg.optimizer.steps, 5),
            "masks_trained_together": len(lams),
        }
        if wants_evidence(cfg):
            evidence = gather_evidence(cfg, job, splits, objectives, mask[0])
            write_evidence(run_dir, evidence, job.layout.names(), tracker if cfg.plots else None)
        results = []
        for k, (lam, out_dir, prefix) in enumerate(zip(lams, out_dirs, prefixes)):
            metrics = {key: float(v[k]) for key, v in final.items()}
            metrics |= {f"continuous/{key}": float(v[k]) for key, v in continuous.items()}
            results.append(
                write_outputs(
                    cfg,
                    job,
                    out_dir,
                    lam,
                    mask[k],
                    rounded[k],
                    metrics,
                    baseline,
                    histories[k],
                    warnings,
                    tracker,
                    prefix,
                    timing,
                    write_history=batched,
                )
            )
        if batched:
            write_summary(run_dir)
        failed = False
        return results
    finally:
        tracker.close(failed=failed)


def write_outputs(
    cfg,
    job: Job,
    out_dir: Path,
    lam: float,
    mask,
    rounded,
    final,
    baseline,
    history,
    warnings,
    tracker: Tracker,
    prefix: str,
    timing,
    write_history: bool,
) -> Dict[str, Any]:
    """mask.safetensors, plots, then circuit.json last: its presence marks a finished run."""
    layout = job.layout
    names = layout.names()
    write_tensors(out_dir / "mask.safetensors", {"continuous": mask, "rounded": rounded}, {"names": json.dumps(names)})
    if write_history:  # the run directory's metrics.jsonl holds every lambda; each result gets its own
        write_text(out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    circuit = circuit_table(mask, rounded, layout)
    export_circuit(out_dir, mask, rounded, layout, job.model.config.get_text_config().hidden_size)
    n_patched = len(circuit)
    planted = planted_scores(job.model, [row["name"] for row in circuit])
    summary = {"n_patched": n_patched, "fraction_patched": n_patched / layout.n_components, **final}
    if planted:
        summary |= {"planted/precision": planted["precision"], "planted/recall": planted["recall"]}
    tracker.summary({prefix + k: v for k, v in summary.items()} | {f"baseline/{k}": v for k, v in baseline.items()})
    tracker.table(prefix + "circuit", list(CIRCUIT_COLUMNS), [[r[c] for c in CIRCUIT_COLUMNS] for r in circuit])
    if cfg.plots:
        plots.mask_heatmap(
            mask.cpu().numpy(),
            out_dir / "mask_heatmap.png",
            f"{n_patched} of {layout.n_components} components patched (λ={lam:g})",
        )
        plots.training_curves(history, out_dir / "curves.png")
        tracker.image(prefix + "mask_heatmap", out_dir / "mask_heatmap.png")
        tracker.image(prefix + "curves", out_dir / "curves.png")
        heads = [(r["layer"], r["head"]) for r in circuit if r["kind"] == "head"]
        if heads:
            test_pairs = next(iter(job.data.values())).test
            weights, labels = final_position_attention(job.model, job.tokenizer, job.encoder.encode(test_pairs), heads)
            plots.attention_figure(
                weights.numpy(), labels, [f"L{layer}.H{head}" for layer, head in heads], out_dir / "attention.png"
            )
            tracker.image(prefix + "attention", out_dir / "attention.png")
    result = {
        "status": "complete",
        "circuit": circuit,
        "n_patched": n_patched,
        "n_components": layout.n_components,
        "fraction_patched": n_patched / layout.n_components,
        "lam": lam,
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "metrics": final,
        "baseline": baseline,
        "planted": planted,
        "warnings": warnings,
        "model": {
            "kind": cfg.model.kind,
            "name_or_path": cfg.model.name_or_path,
            "model_type": job.model.config.model_type,
            "n_layers": layout.n_layers,
            "n_heads": layout.n_heads,
            "dtype": cfg.model.dtype,
            "device": cfg.model.device,
            **{key: cfg.model.get(key) for key in ("device_map", "quantization", "gguf_file")},
        },
        "data": {
            "fingerprint": data_fingerprint(job.data, cfg.dataset.template),
            "template": cfg.dataset.template,
            "train_ops": list(cfg.dataset.train_ops),
            "transfer_ops": list(cfg.dataset.transfer_ops),
            "sizes": {
                n: {"train": len(v.train), "test": len(v.test), "transfer": len(v.transfer)}
                for n, v in job.data.items()
            },
            "seed": cfg.seed,
        },
        "desiderata": OmegaConf.to_container(cfg.desiderata, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "engine": {"name": cfg.engine, "cache": cfg.cache},
        "timing": timing,
        "versions": {
            "circuitfind": circuitfind.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    write_json(out_dir / "circuit.json", result)
    m = result["metrics"]
    log.info(
        f"λ={lam:g}: {n_patched} of {layout.n_components} components patched "
        f"{[row['name'] for row in circuit][:12]}; held-out VD acc {m.get('vd_test/acc', float('nan')):.2f}, "
        f"OI acc {m.get('oi_test/acc', float('nan')):.2f}, VD transfer {m.get('vd_transfer/acc', float('nan')):.2f}; "
        f"written to {out_dir}"
    )
    if planted:
        log.info(
            f"λ={lam:g}: against the circuit planted in the model {planted['planted']}: "
            f"precision {planted['precision']:.2f}, recall {planted['recall']:.2f}"
        )
    return result
