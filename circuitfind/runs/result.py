"""What one result of a search becomes: its circuit.json record, its attention figure, the circuit it tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
import transformers
from omegaconf import OmegaConf

from circuitfind.config.choices import LAST
from circuitfind.evaluation.attention import attention_by_slot, final_position_attention
from circuitfind.evaluation.planted import planted_scores
from circuitfind.records import plots, unit_plots
from circuitfind.records.circuit import CircuitRecord, circuit_table
from circuitfind.records.circuit_source import CircuitUnderTest, from_members
from circuitfind.records.writer import Figure, SearchResult
from circuitfind.runs.job import Job
from circuitfind.task.pairs import data_fingerprint
from circuitfind.task.positions import is_index
from circuitfind.version import __version__


@dataclass
class RunFacts:
    """What every result of one run shares: the unpatched model's metrics, warnings and timings."""

    baseline: Dict[str, float]
    baseline_ci: Dict[str, List[float]]
    warnings: List[str]
    timing: Dict[str, Any]
    checks: Dict[str, Any]
    lambda_search: Dict[str, Any]  # optimizer.target_size: every lambda tried and the one chosen


def make_record(job: Job, result: SearchResult, facts: RunFacts) -> CircuitRecord:
    """The circuit.json record of one result."""
    cfg, space = job.cfg, job.space
    circuit = circuit_table(result.mask, result.circuit, space)
    model_config = job.model.config.get_text_config()
    return CircuitRecord(
        circuit=circuit,
        n_patched=len(circuit),
        n_components=space.n_components,
        fraction_patched=len(circuit) / space.n_components,
        lam=result.lam,
        method=OmegaConf.to_container(cfg.method, resolve=True),
        metrics=result.metrics,
        metrics_ci=result.metrics_ci,
        baseline=facts.baseline,
        baseline_ci=facts.baseline_ci,
        checks=facts.checks,
        lambda_search=facts.lambda_search,
        planted=planted_scores(job.truth, [row["name"] for row in circuit]),
        headline_circuit="pruned" if result.pruning is not None else "rounded",
        raw=raw_record(job, result),
        pruning=result.pruning or {},
        warnings=facts.warnings,
        model={
            "kind": cfg.model.kind,
            "name_or_path": cfg.model.name_or_path,
            "model_type": job.model.config.model_type,
            "n_layers": space.n_layers,
            "n_heads": space.n_heads,
            "units": space.facts(),
            "hidden_size": model_config.hidden_size,
            "dtype": cfg.model.dtype,
            "device": str(job.device),
            **{key: cfg.model.get(key) for key in ("device_map", "quantization", "gguf_file")},
        },
        data={
            "fingerprint": data_fingerprint(job.data),
            "task": job.task.name,
            "template": job.task.template,
            "sizes": {
                n: {"train": len(v.train), "test": len(v.test), "transfer": len(v.transfer)}
                for n, v in job.data.items()
            },
            "seed": cfg.seed,
        },
        desiderata=OmegaConf.to_container(cfg.desiderata, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        engine={"name": cfg.engine, "cache": cfg.cache},
        timing=facts.timing,
        versions={
            "circuitfind": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        config=OmegaConf.to_container(cfg, resolve=True),
        attention=slot_attention(job, circuit),
    )


def raw_record(job: Job, result: SearchResult) -> Dict[str, Any]:
    """When the circuit was pruned: the rounded mask's circuit, its held-out figures and planted scores."""
    if result.raw is None:
        return {}
    names = result.raw["circuit"]
    return {"n_patched": len(names), **result.raw, "planted": planted_scores(job.truth, names)}


def final_heads(circuit: List[Dict[str, Any]]) -> List[tuple[int, int]]:
    """(layer, head) of the circuit's heads at the final position: the attention figure shows where they look."""
    return [(row["layer"], row["head"]) for row in circuit if row["kind"] == "head" and row["position"] == LAST]


def slot_attention(job: Job, circuit: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Where each circuit head looks from its own position, by slot, on the first desideratum's test prompts."""
    rows = [row for row in circuit if row["kind"] == "head"]
    if not rows:
        return {}
    prompts = [pair.base for pair in next(iter(job.data.values())).test]
    heads, queries = [(row["layer"], row["head"]) for row in rows], [row["position"] for row in rows]
    return attention_by_slot(job.model, job.encoder, job.task, prompts, heads, queries, [row["name"] for row in rows])


def attention_figure(job: Job, record: CircuitRecord) -> Dict[str, Figure]:
    """The final-position attention of the circuit's heads over the first desideratum's test prompts."""
    heads = final_heads(record.circuit)
    if not heads:
        return {}

    def draw(path: Path) -> None:
        first = next(iter(job.data))
        weights, labels = final_position_attention(job.model, job.tokenizer, job.encoded[(first, "test")], heads)
        plots.attention_figure(weights.numpy(), labels, [f"L{layer}.H{head}" for layer, head in heads], path)

    return {"attention": draw}


def unit_figures(job: Job, result: SearchResult, label: str) -> Dict[str, Figure]:
    """Beyond the paper's space, the mask heatmap is layers x positions (and neurons are counted per layer)."""
    space = job.space
    if space.is_default:
        return {}
    mask, title = result.mask.detach().cpu().numpy(), f"{space.describe()}, {label}"
    labels = position_labels(job)
    figures: Dict[str, Figure] = {
        "mask_heatmap": lambda path: unit_plots.unit_heatmaps(mask, space, labels, path, title)
    }
    if space.kind == "neurons":
        figures["neurons"] = lambda path: unit_plots.neuron_counts(mask, space, path, title)
    return figures


def position_labels(job: Job) -> List[str]:
    """The positions' names; a distance from the end is shown with its token in the longest held-out prompt."""
    prompts = [pair.base.text for pair in next(iter(job.data.values())).test]
    ids = max((job.encoder.ids(text) for text in prompts), key=len)
    return [f"{job.tokenizer.decode([ids[int(p)]])!r} {p}" if is_index(p) else p for p in job.space.positions]


def circuit_of(result: SearchResult, space) -> CircuitUnderTest:
    """The circuit a result reports (pruned, or its rounded mask), ranked by its scores."""
    return from_members(result.circuit.cpu() == 0, space, result.scores.detach().cpu(), "this run")
