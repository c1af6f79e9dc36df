"""Which heads look at which slot, and what patching each alone does.

    python scripts/slot_attention.py task=ioi model=smollm2_135m --slot io --top 12
    python scripts/slot_attention.py task=ioi_repeat model=smollm2_135m 'units.positions=[s2]' --query s2 --slot a

For every head: its attention from the final position (or from `--query`, one of the run's
`units.positions`) to each slot of the task (mean over the first
desideratum's held-out base prompts), and the mean change of that desideratum's logit
difference when this head alone is patched from the alternates, also as a share of patching
everything. Prints the `--top` heads by attention to `--slot` (or `slot#k`, the k-th mention),
so a circuit's heads can be set against the model's own candidates (README, IOI). Any
`circuitfind train` override selects the task, desiderata and model.
"""

from __future__ import annotations

import argparse

import torch

from circuitfind.config.compose import compose_train_config
from circuitfind.evaluation.attention import attention_by_slot
from circuitfind.evaluation.heldout import evaluate_masks, full_effect
from circuitfind.runs.job import Job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="circuitfind train overrides, e.g. task=ioi model=smollm2_135m")
    parser.add_argument("--slot", default="io", help="rank heads by attention to this slot (or slot#k)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--query", default="last", help="the position heads attend from: one of units.positions")
    args = parser.parse_args()
    job = Job(compose_train_config([*args.overrides, "progress=false"]))
    space = job.space
    split = next(s for s in job.eval_splits() if s.kind == "test")
    units = [u for u in space.units() if u.kind == "head" and u.position == args.query]
    if not units:
        raise SystemExit(f"--query {args.query}: not a position of the units; add units.positions=[{args.query}]")
    prompts = [pair.base for pair in job.data[split.desideratum.name].test]
    heads, names = [(u.layer, u.head) for u in units], [u.name for u in units]
    attention = attention_by_slot(job.model, job.encoder, job.task, prompts, heads, [args.query] * len(heads), names)
    ranked = sorted(attention, key=lambda name: -attention[name].get(args.slot, 0.0))[: args.top]
    masks = torch.ones(len(ranked), *space.shape)
    for i, unit in enumerate(space.index(ranked)):
        masks[i, unit.layer, unit.col] = 0.0  # this head alone patched
    effect = evaluate_masks(split, job.engine, masks)
    full = float(full_effect(split))
    labels = list(attention[ranked[0]])
    print(f"{split.name}: d = logit[up] - logit[down]; patching everything moves it by {full:+.2f}")
    print(f"| head | {' | '.join(labels)} | Δd patched alone | share |\n|---|{'---|' * (len(labels) + 2)}")
    for name, d, share in zip(ranked, effect["logit_diff"].tolist(), effect["logit_diff_norm"].tolist()):
        row = " | ".join(f"{attention[name][label]:.2f}" for label in labels)
        print(f"| {name} | {row} | {d:+.2f} | {share:+.2f} |")


if __name__ == "__main__":
    main()
