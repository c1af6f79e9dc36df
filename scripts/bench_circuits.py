"""Scoring circuits, as pruning does: each from its own first patched token and layer, circuits that
patch the same units before their latest position sharing that part's run ("own start"), against the
same without sharing ("whole": each runs whole from its own start) and against every circuit run from
the earliest unit position through every layer ("earliest": what engine=cached did before both).

On a random-weight LLaMA of the given shape, the paper's task at `--positions` (default x's tokens
and the final token), in this one process, 8 circuits per forward (pruning's CPU chunk). Each kind
of circuit is modelled on pruning's trials:

  late heads @last        four heads at layers 2/3 of the way up, at the final token (the organism's
                          planted heads, SmolLM2's name movers)
  late heads + MLP @last  the same and an MLP one layer up (putting a unit in)
  ... + a head @x         the same and a layer-0 head at x, a different one each: no gain, since the
                          run must start at x and at layer 0
  swap trials @x          a swap round: one of the four late heads out, one of two layer-0 heads at x
                          in; the four trials of each head at x share its run up to the final token
  singles + swaps @x      a circuit of two late heads: the exact search's single heads at x, scored
                          with the swap trials that put each beside one late head; each head alone
                          shares its trials' run (and runs its final token unpatched on it)
  mixed                   two of each of the above and two single late heads: a chunk of several groups

Then the same at `--positions` on OI's pairs, whose alternates change the operator only: a unit at x
patches in its clean value, so "own start" (as pruning scores) leaves it out and runs from the final
token, where "whole" and "earliest" patch it.

    python scripts/bench_circuits.py                          # SmolLM2-135M shape, batch 50
    python scripts/bench_circuits.py --shape organism
    python scripts/bench_circuits.py --device cuda --dtype bfloat16 --shape llama13b   # on a GPU
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from bench import random_llama, timed_round_robin
from bench_units import paper_pairs, shape_arguments

from circuitfind.model.components import UnitsChoice, locate_components
from circuitfind.model.engine import make_engine
from circuitfind.model.loading import DTYPES
from circuitfind.model.masks import masks_of

CHUNK = 8  # circuits per forward: methods/prune.py's CPU_CHUNK


def circuit_kinds(space) -> Dict[str, List[List[int]]]:
    """CHUNK circuits of each kind, as flat unit indices (see the module docstring)."""
    late = (2 * space.n_layers) // 3
    index = {unit.name: space.flat(unit) for unit in space.units()}
    at = "@last" if not space.is_default else ""

    def heads(shift: int) -> List[int]:
        return [index[f"L{late}.H{(shift + h) % space.n_heads}{at}"] for h in range(4)]

    mlp = index[f"L{min(late + 1, space.n_layers - 1)}.MLP{at}"]
    kinds = {
        "late heads @last": [heads(i) for i in range(CHUNK)],
        "late heads + MLP @last": [heads(i) + [mlp] for i in range(CHUNK)],
    }
    if "x" in space.positions:
        kinds["... + a head @x"] = [heads(i) + [index[f"L0.H{i % space.n_heads}@x"]] for i in range(CHUNK)]
        put = [index[f"L0.H{h}@x"] for h in range(CHUNK // 4)]
        kinds["swap trials @x"] = [heads(0)[:out] + heads(0)[out + 1 :] + [unit] for unit in put for out in range(4)]
        pair = heads(0)[:2]  # a circuit of two: the exact search's single units, scored with the swap round's trials
        kinds["singles + swaps @x"] = [c for unit in put for c in ([unit], [pair[0], unit], [pair[1], unit])]
    mixed = [c for circuits in kinds.values() for c in circuits[:2]] + [[index[f"L{late}.H{h}{at}"]] for h in range(2)]
    return kinds | {"mixed": mixed[:CHUNK]}


def bench_circuits(
    shape: str, positions: Sequence[str], batch: int, repeats: int, device: str, dtype, desideratum: str = "vd"
) -> None:
    model, tok = random_llama(shape, dtype, device)
    _, enc = paper_pairs(tok, positions, batch, device, desideratum)
    sites = locate_components(model, UnitsChoice("heads_mlps", tuple(positions)))
    eng = make_engine("cached", model, sites)
    # a batch prepared per way: each keeps its own buffers and clean run, as one pruning run does (its final state
    # d0's: a circuit that patches nothing does not run), so that no way pays for restoring what another wrote
    own, alone, first = (eng.prepare(enc) for _ in range(3))
    for prep in (own, alone, first):
        eng.clean_final(prep, keep=True)
    steps: Dict[str, Callable[[], None]] = {}
    for kind, circuits in circuit_kinds(sites.space).items():
        masks = masks_of(circuits, sites.space.shape, device)

        def own_start(masks=masks) -> None:
            with torch.no_grad():
                eng.final_hidden(own, masks)

        def whole(masks=masks) -> None:  # each circuit whole from its own start, no part shared
            with torch.no_grad():
                eng._grouped(alone, masks, None)

        def earliest(masks=masks) -> None:  # every circuit from the earliest site through every layer
            with torch.no_grad():
                eng._final_hidden_from(first, masks, None, first.offset, 0)

        steps[f"{kind}|own"], steps[f"{kind}|whole"], steps[f"{kind}|earliest"] = own_start, whole, earliest
    for fn in steps.values():
        fn()  # warm-up (the first run from a later start keeps the batch's clean run)
    medians = timed_round_robin(steps, repeats, device)
    suffix = enc.base_ids.shape[1] - own.offset
    print(
        f"\n## {shape}, {desideratum.upper()}, positions {list(positions)}, {batch} pairs, {CHUNK} circuits per forward"
    )
    print(f"(from the earliest site: {suffix} tokens through {sites.space.n_layers} layers)")
    print(
        f"{'circuits':<24} {'own start ms':>13} {'whole ms':>9} {'earliest ms':>12} {'own / whole':>12} {'own / earliest':>15}"
    )
    for kind in dict.fromkeys(name.split("|")[0] for name in steps):
        own, alone, first = (medians[f"{kind}|{way}"] for way in ("own", "whole", "earliest"))
        print(
            f"{kind:<24} {own * 1e3:>13.1f} {alone * 1e3:>9.1f} {first * 1e3:>12.1f} {own / alone:>11.2f}x {own / first:>14.2f}x"
        )


def main() -> None:
    args = shape_arguments(__doc__, batch=50)
    for positions in (["last"], args.positions) if args.positions != ["last"] else (["last"],):
        bench_circuits(args.shape, positions, args.batch, args.repeats, args.device, DTYPES[args.dtype])
    if args.positions != ["last"]:  # OI's alternates share x with their bases: its units there patch nothing
        bench_circuits(args.shape, args.positions, args.batch, args.repeats, args.device, DTYPES[args.dtype], "oi")


if __name__ == "__main__":
    main()
