"""Which heads look at which slot: every head's final-position attention to each slot of a task.

    python scripts/slot_attention.py --task ioi --model smollm2 --slot io --top 12

Prints the heads that attend most to `--slot` from the final position (mean over n prompts of
the task's train split, forms drawn as a run draws them), with their attention to every other
slot, so a circuit's heads can be set against the model's own candidates (README, IOI).
"""

from __future__ import annotations

import argparse

import torch

from circuitfind.config import ModelConfig
from circuitfind.model.components import locate_components
from circuitfind.model.loading import load_model
from circuitfind.study.accuracy import task_prompts
from circuitfind.study.attention import attention_by_slot
from circuitfind.task.library import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--model", default="smollm2", help="a model kind: smollm2, organism, tiny_llama")
    parser.add_argument("--slot", default="io", help="rank heads by attention to this slot (or slot#k)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(kind=args.model))
    space = locate_components(loaded.model).space
    heads = [(layer, head) for layer in range(space.n_layers) for head in range(space.n_heads)]
    task = load_task(args.task)
    attention = attention_by_slot(loaded.model, loaded.tokenizer, task, task_prompts(task, "train", args.n), heads)
    ranked = sorted(attention.items(), key=lambda item: -item[1].get(args.slot, 0.0))[: args.top]
    labels = list(ranked[0][1])
    print(f"| head | {' | '.join(labels)} |\n|---|{'---|' * len(labels)}")
    for name, masses in ranked:
        print(f"| {name} | " + " | ".join(f"{masses[label]:.2f}" for label in labels) + " |")


if __name__ == "__main__":
    main()
