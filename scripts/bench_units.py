"""Mask-training step cost per unit kind, against the bare forward and backward of the same suffix.

For each unit kind at the same positions (`--positions`, default x's tokens and the final
token of the paper's task), on a random-weight LLaMA of the given shape, in this one process:

  step    engine=cached: the suffix from the earliest site on the cached prefix, every unit
          mixed at its sites, forward and backward into the mask
  floor   the same suffix on the same cached prefix with no hook at all, forward and backward
          into its input embeddings, reading the same two unembedding rows per example

and the ratios step / floor (target <= 1.3 for every kind) and neurons / heads_mlps (target
<= 1.5 with single neurons on the SmolLM2-135M shape: 30 x 1,536 = 46,080 units per position).

    python scripts/bench_units.py                          # SmolLM2-135M shape, batch 32
    python scripts/bench_units.py --shape organism --positions last
    python scripts/bench_units.py --device cuda --dtype bfloat16 --shape llama13b   # on a GPU
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, Sequence

import torch
from bench import SHAPES, floor_step, random_llama, timed_round_robin
from transformers.cache_utils import DynamicCache

from circuitfind.methods.objective import patched_delta, unpatched_logit_diff
from circuitfind.model.components import UnitsChoice, locate_components
from circuitfind.model.engine import make_engine, returned_cache, with_cache
from circuitfind.model.loading import DTYPES
from circuitfind.model.readout import Readout
from circuitfind.task.encoding import PairEncoder, position_ids
from circuitfind.task.library import load_desiderata, load_task, sample_pairs
from circuitfind.task.positions import PositionFinder

KINDS = {"heads_mlps": 1, "residual": 1, "neurons": 1}  # kind -> group size


def prefix_of(model, enc, offset: int):
    """The base prompts' keys/values before `offset`, as engine=cached keeps them."""
    with torch.no_grad():
        out = model.base_model(
            input_ids=enc.base_ids[:, :offset],
            attention_mask=enc.base_attn[:, :offset],
            position_ids=position_ids(enc.base_attn[:, :offset]),
            **with_cache(model.base_model, DynamicCache()),
        )
    return [(layer[0], layer[1]) for layer in returned_cache(out)]


def paper_pairs(tok, positions: Sequence[str], batch: int, device: str, desideratum: str = "vd"):
    """One of the paper's desiderata (VD; OI, whose alternates change the operator only) and `batch` of its pairs,
    encoded with the units' positions (one prompt length)."""
    ops = ["+"] if desideratum == "vd" else ["+", "-"]
    task = load_task("arithmetic", {"slots": {"op": {"values": ops}}})
    des = {d.name: d for d in load_desiderata("vd_oi", task)}[desideratum]
    pairs = sample_pairs(task, des, batch, seed=0)
    return des, PairEncoder(tok, finder=PositionFinder(tok, task, positions)).encode(pairs, des).to(device)


def bench_units(shape: str, positions: Sequence[str], batch: int, repeats: int, device: str, dtype) -> None:
    model, tok = random_llama(shape, dtype, device)
    vd, enc = paper_pairs(tok, positions, batch, device)
    steps: Dict[str, Callable[[], None]] = {}
    units: Dict[str, int] = {}
    offset = 0
    for kind, group in KINDS.items():
        sites = locate_components(model, UnitsChoice(kind, tuple(positions), group))
        eng = make_engine("cached", model, sites)
        prep = eng.prepare(enc)
        offset = prep.offset
        d0 = unpatched_logit_diff(eng, prep)
        mask = torch.full((1, *sites.space.shape), 0.7, device=device, requires_grad=True)

        def step(eng=eng, prep=prep, d0=d0, mask=mask) -> None:
            vd.loss_of(patched_delta(eng, prep, d0, mask), None).sum().backward()

        steps[kind], units[kind] = step, sites.space.n_components
    floor = floor_step(model, prefix_of(model, enc, offset), enc, Readout(model))
    steps["floor"] = lambda: floor()
    for fn in steps.values():
        fn()  # warm-up
    medians = timed_round_robin(steps, repeats, device)
    suffix = enc.base_ids.shape[1] - offset
    print(f"\n## {shape}, positions {list(positions)}: suffix of {suffix} tokens after a cached prefix of {offset}")
    print(f"{'variant':<12} {'units':>8} {'ms/step':>9} {'vs floor':>9}")
    for name, seconds in medians.items():
        ratio = seconds / medians["floor"]
        print(f"{name:<12} {units.get(name, 0):>8,} {seconds * 1e3:>9.1f} {ratio:>8.2f}x")
    print(f"neurons / heads_mlps: {medians['neurons'] / medians['heads_mlps']:.2f}x [target <= 1.5]")
    worst = max(medians[k] / medians["floor"] for k in KINDS)
    print(f"worst unit kind / floor: {worst:.2f}x [target <= 1.3]")


def shape_arguments(doc: str, batch: int) -> argparse.Namespace:
    """The arguments of a one-process benchmark on a random-weight shape (shape, positions, batch, repeats,
    device, dtype, threads); sets the threads and prints the set-up line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    parser.add_argument("--positions", nargs="+", default=["x", "last"])
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, batch {args.batch}, "
        f"median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    return args


def main() -> None:
    args = shape_arguments(__doc__, batch=32)
    bench_units(args.shape, args.positions, args.batch, args.repeats, args.device, DTYPES[args.dtype])


if __name__ == "__main__":
    main()
