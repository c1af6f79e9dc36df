"""Mask-training step cost: circuitfind's engines against the published script's style.

Prints, for each model shape, ms per optimisation step (median of several, per example and
per step), peak memory, and ratios, all measured in this one process:

  (a) published style: full sequence, full-vocabulary logits at every position, a Python
      loop over heads with o_proj re-computed per head in the hook
  (b) engine=full      (c) engine=cached      (d) engine=cached, 8 lambdas at once, per mask
  (e) floor: a bare forward and backward of the final token on the cached prefix, no hooks,
      reading the same two unembedding rows per example; (e') the same at 8x the batch,
      per original batch: the most that batching 8 masks can save on this machine

Variants are timed in turn within each repeat, so that other load hits all of them alike.

    python scripts/bench.py                       # organism + SmolLM2-135M shape, batch 32
    python scripts/bench.py --shapes smollm2 --batch 32 --repeats 7
    python scripts/bench.py --shapes llama13b --device cuda --dtype float16   # on a GPU
    python scripts/bench.py --setup tinyllama1b   # preparation and evaluation against 100 training steps
    python scripts/bench.py --prepare smollm2     # preparing a batch: alternates from the tokens they share
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, List

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from circuitfind.methods.objective import patched_delta, unpatched_logit_diff
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.model.components import locate_components
from circuitfind.model.engine import (
    make_engine,
    prefix_buffers,
    returned_cache,
    shared_tokens,
    suffix_slot_cache,
    with_cache,
)
from circuitfind.model.hooks import SiteValues, record_final_values
from circuitfind.model.loading import DTYPES
from circuitfind.model.readout import Readout
from circuitfind.task.encoding import PairEncoder, position_ids
from circuitfind.task.library import load_desiderata, load_task, sample_pairs
from circuitfind.task.pairs import make_pairs

SHAPES = {
    # name: (layers, heads, kv heads, hidden, intermediate, vocab)
    "organism": (4, 8, 8, 64, 256, None),
    "smollm2": (30, 9, 3, 576, 1536, 49152),
    "llama13b": (40, 40, 40, 5120, 13824, 32000),
    "tinyllama1b": (22, 32, 4, 2048, 5632, 32000),  # TinyLlama-1.1B's shape
    "llama7b": (32, 32, 32, 4096, 11008, 32000),  # LLaMA-2-7B's shape
}


def random_llama(shape: str, dtype: torch.dtype, device: str):
    layers, heads, kv, hidden, inter, vocab = SHAPES[shape]
    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False), tok


class PublishedStyle:
    """The published script's step: whole prompt, all logits, a Python loop over heads."""

    def __init__(self, model, sites, enc, alt_values: SiteValues):
        self.model, self.sites, self.enc, self.alt = model, sites, enc, alt_values
        self.readout = Readout(model)

    def step(self, mask: torch.Tensor) -> torch.Tensor:
        space = self.sites.space
        hd = space.head_dim
        handles = []

        def head_hook(layer):
            def hook(module, args, output):
                x = args[0][:, -1]  # (B, H*D)
                new_last = 0
                for h in range(space.n_heads):  # one einsum per head re-computes o_proj's share
                    w_h = module.weight[:, h * hd : (h + 1) * hd]
                    base = torch.einsum("bd,od->bo", x[:, h * hd : (h + 1) * hd], w_h)
                    alt = torch.einsum("bd,od->bo", self.alt.points["heads"][layer][:, h * hd : (h + 1) * hd], w_h)
                    new_last = new_last + mask[0, layer, h] * base + (1 - mask[0, layer, h]) * alt
                return torch.cat([output[:, :-1], new_last[:, None].to(output.dtype)], dim=1)

            return hook

        def mlp_hook(layer):
            def hook(module, args, output):
                w = mask[0, layer, space.n_heads]
                mixed = w * output[:, -1] + (1 - w) * self.alt.points["mlps"][layer]
                return torch.cat([output[:, :-1], mixed[:, None].to(output.dtype)], dim=1)

            return hook

        for i, (proj, mlp) in enumerate(zip(self.sites.head_projs, self.sites.mlps)):
            handles += [proj.register_forward_hook(head_hook(i)), mlp.register_forward_hook(mlp_hook(i))]
        try:
            e = self.enc
            logits = self.model(
                input_ids=e.base_ids, attention_mask=e.base_attn, position_ids=position_ids(e.base_attn)
            ).logits  # (B, T, V): every position
            last = logits[:, -1].float()
            rows = torch.arange(len(e))
            return last[rows, e.alt_answer] - last[rows, e.base_answer]
        finally:
            for h in handles:
                h.remove()


def floor_step(model, prefix_kv, enc, readout) -> Callable[[], torch.Tensor]:
    """Forward and backward of the suffix after the cached prefix alone, with no hook: the least a
    mask step on that suffix can cost (the final token alone after a prefix of T-1)."""
    embed = model.get_input_embeddings()
    offset = prefix_kv[0][0].shape[2]
    # The same no-copy cache as engine=cached.
    buffers = prefix_buffers(prefix_kv, 1, [enc.base_ids.device] * len(prefix_kv), enc.base_ids.shape[1])

    def step() -> torch.Tensor:
        x = embed(enc.base_ids[:, offset:]).detach().requires_grad_(True)
        out = model.base_model(
            inputs_embeds=x,
            attention_mask=enc.base_attn,
            position_ids=position_ids(enc.base_attn)[:, offset:],
            **with_cache(model.base_model, suffix_slot_cache(buffers, offset)),
        )
        d = readout.logit_diff(out.last_hidden_state[:, -1][None], enc.alt_answer, enc.base_answer)
        d.mean().backward()
        return d

    return step


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.libc = ctypes.CDLL("libc.so.6") if not self.cuda else None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    @contextmanager
    def measure(self, result: Dict[str, float]):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            result["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
            return
        self.libc.malloc_trim(0)  # hand freed memory back so the next block starts clean
        start, peak, stop = self._rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.0005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            result["peak_mb"] = max(0, peak[0] - start) / 2**20


def once(fn: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed_round_robin(fns: Dict[str, Callable[[], None]], repeats: int, device: str) -> Dict[str, float]:
    """Median seconds of each function, timed in turn within each repeat so that a slow
    patch of machine time (another process, frequency scaling) hits every variant alike."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(shape: str, batch: int, repeats: int, device: str, dtype: torch.dtype) -> Dict[str, Dict[str, float]]:
    model, tok = random_llama(shape, dtype, device)
    sites = locate_components(model)
    task = load_task("arithmetic")
    vd = load_desiderata("vd_oi", task)[0]
    pairs = sample_pairs(task, vd, batch, seed=0)
    enc = PairEncoder(tok).encode(pairs, vd).to(device)
    readout = Readout(model)
    memory = PeakMemory(device)
    results: Dict[str, Dict[str, float]] = {}

    def engine_step(name: str, k: int) -> Callable[[], None]:
        eng = make_engine(name, model, sites)
        prep = eng.prepare(enc)
        d0 = unpatched_logit_diff(eng, prep)
        mask = torch.full((k, *sites.space.shape), 0.7, device=device, requires_grad=True)
        return lambda: vd.loss_of(patched_delta(eng, prep, d0, mask), None).sum().backward()

    with torch.no_grad(), record_final_values(sites, *enc.alt_ids.shape) as alt_values:
        model.base_model(input_ids=enc.alt_ids, attention_mask=enc.alt_attn, position_ids=position_ids(enc.alt_attn))
    published = PublishedStyle(model, sites, enc, alt_values)
    pub_mask = torch.full((1, *sites.space.shape), 0.7, device=device, requires_grad=True)
    with torch.no_grad():
        out = model.base_model(
            input_ids=enc.base_ids[:, :-1],
            attention_mask=enc.base_attn[:, :-1],
            position_ids=position_ids(enc.base_attn[:, :-1]),
            **with_cache(model.base_model, None),
        )
        prefix_kv = [(layer[0], layer[1]) for layer in returned_cache(out)]

    k = 8
    big = PairEncoder(tok).encode(pairs * k, vd).to(device)  # the batch (d) runs through the model
    with torch.no_grad():
        out = model.base_model(
            input_ids=big.base_ids[:, :-1],
            attention_mask=big.base_attn[:, :-1],
            position_ids=position_ids(big.base_attn[:, :-1]),
            **with_cache(model.base_model, None),
        )
        big_kv = [(layer[0], layer[1]) for layer in returned_cache(out)]
    variants = {
        "(a) published style": (lambda: (-published.step(pub_mask).mean()).backward(), 1),
        "(b) engine=full": (engine_step("full", 1), 1),
        "(c) engine=cached": (engine_step("cached", 1), 1),
        f"(d) cached, {k} lambdas, per mask": (engine_step("cached", k), k),
        "(e) floor: final token, no hooks": (floor_step(model, prefix_kv, enc, readout), 1),
        f"(e') floor at {k}x the batch, per {batch}": (floor_step(model, big_kv, big, readout), k),
    }
    for name, (fn, _) in variants.items():  # warm-up and peak memory, one variant at a time
        row: Dict[str, float] = {}
        with memory.measure(row):
            fn()
        results[name] = row
    medians = timed_round_robin({name: fn for name, (fn, _) in variants.items()}, repeats, device)
    for name, (_, masks) in variants.items():
        seconds = medians[name] / masks
        results[name]["ms_per_step"] = seconds * 1e3
        results[name]["ms_per_example"] = seconds * 1e3 / batch
    return results


PAIR_CASES = {
    # name: (task, overrides, desiderata): 10,000 pairs of the first desideratum, from a fresh task
    "ioi": ("ioi", {}, "ioi"),
    "arithmetic, y in 10..999": ("arithmetic", {"slots": {"y": {"range": [10, 999]}}}, "vd_oi"),
}


def bench_pairs(n: int = 10_000, repeats: int = 3) -> None:
    """Seconds to draw n balanced pairs, problems enumerated from scratch (median of repeats)."""
    print(f"\n## pair generation, {n:,} pairs of the first desideratum [target < 2 s]")
    for name, (task_name, overrides, desiderata) in PAIR_CASES.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            task = load_task(task_name, overrides)
            (pairs,) = make_pairs(task, load_desiderata(desiderata, task)[0], "train", [n], random.Random(0))
            times.append(time.perf_counter() - started)
        print(
            f"{name}: {statistics.median(times):.2f} s for {len(pairs):,} pairs ({len(task.problems('train')):,} problems)"
        )


def bench_setup(shape: str, steps: int = 3) -> None:
    """Set-up cost: one `circuitfind train` run (random weights of this shape, the paper's 50 pairs
    per split) timed by phase, with the whole-prompt pass that preparation no longer runs timed
    beside it, in the same process; then preparation and evaluation as a share of a 100-step run."""
    import tempfile
    from pathlib import Path

    from circuitfind.config.compose import compose_train_config
    from circuitfind.runs.job import Job
    from circuitfind.runs.train import Run

    layers, heads, kv, hidden, inter, _ = SHAPES[shape]
    shape_keys = dict(n_layers=layers, n_heads=heads, n_kv_heads=kv, hidden=hidden, intermediate=inter)
    overrides = ["+desiderata=vd_oi", "model=tiny_llama", f"optimizer.steps={steps}", "progress=false", "plots=false"]
    cfg = compose_train_config(overrides + [f"model.tiny.{k}={v}" for k, v in shape_keys.items()])
    started = time.perf_counter()
    job = Job(cfg)
    load = time.perf_counter() - started
    started = time.perf_counter()
    run = Run(job)  # every batch prepared, unpatched references, self-checks
    prepare = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():  # the passes the old preparation also ran: clean base runs, clean alternate runs
        for split in run.splits:
            for prep in split.batches:
                job.engine.clean_hidden(prep.pairs.base_ids, prep.pairs.base_attn)
                job.engine.clean_hidden(prep.pairs.alt_ids, prep.pairs.alt_attn)
        for objective in run.objectives:
            for prep in objective.batches:
                job.engine.clean_hidden(prep.pairs.base_ids, prep.pairs.base_attn)
    old_extra = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        record = run.execute(Path(folder) / "run")[0]
        execute = time.perf_counter() - started
    train = record.timing["train_s"]
    evaluate = execute - train
    step = train / steps
    hundred = 100 * step
    share = (prepare + evaluate) / (prepare + evaluate + hundred)
    share_before = (prepare + old_extra + evaluate) / (prepare + old_extra + evaluate + hundred)
    print(f"\n## set-up cost, {shape} {SHAPES[shape][:5]}, {torch.get_num_threads()} threads")
    print("| phase | s |\n|---|---|")
    for name, value in [
        ("load (random weights)", load),
        ("prepare (2 whole-prompt passes per batch, self-checks)", prepare),
        ("the passes no longer run (old: 3 per train batch, 4 per held-out batch)", old_extra),
        (f"train, per step ({steps} steps)", step),
        ("evaluate (held-out metrics, circuit tests, records)", evaluate),
    ]:
        print(f"| {name} | {value:.1f} |")
    print(
        f"preparation + evaluation = {share:.0%} of a 100-step run [target <= 30%]; with the old passes "
        f"{share_before:.0%}; preparation {prepare + old_extra:.0f} s -> {prepare:.0f} s"
    )


def bench_prepare(shape: str, n_pairs: int, repeats: int) -> None:
    """Preparing a batch, by desideratum: the alternates run from their first token that differs from the base
    (on the base prefix's keys/values, which preparation runs anyway) against the whole alternate prompts, both
    with the base prefix, timed in turn in this process (random weights of this shape, the organism's task)."""
    from circuitfind.model.engine import FullEngine
    from circuitfind.model.hooks import SiteIndex

    model, tok = random_llama(shape, torch.float32, "cpu")
    engine = make_engine("cached", model, locate_components(model))
    task = load_task("arithmetic")
    print(f"\n## preparing {n_pairs} pairs, {shape} {SHAPES[shape][:5]}, median of {repeats}")
    print(
        "| desideratum | tokens shared | whole alternates, ms | from the shared tokens, ms | ratio |\n|---|---|---|---|---|"
    )
    for des in load_desiderata("vd_oi", task):
        enc = PairEncoder(tok).encode(sample_pairs(task, des, n_pairs, 0), des)

        def whole(enc=enc) -> None:  # what preparation ran before: the alternates' whole prompts, the base prefix
            FullEngine.prepare(engine, enc)
            engine._prefix_kv(enc, int(SiteIndex.of(enc.base_pos, enc.alt_pos).base_tok.min()))

        times = timed_round_robin({"whole": whole, "shared": lambda enc=enc: engine.prepare(enc)}, repeats, "cpu")
        print(
            f"| {des.name} | {shared_tokens(enc)} of {enc.alt_ids.shape[1]} | {1e3 * times['whole']:.1f} | "
            f"{1e3 * times['shared']:.1f} | {times['shared'] / times['whole']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["organism", "smollm2"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--pairs", action="store_true", help="only the pair-generation benchmark")
    parser.add_argument("--setup", choices=list(SHAPES), help="only the set-up cost of one run at this shape")
    parser.add_argument("--prepare", choices=list(SHAPES), help="only preparing a batch's pairs, at this shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.setup:
        bench_setup(args.setup)
        return
    if args.prepare:
        bench_prepare(args.prepare, 4 * args.batch, args.repeats)
        return
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, batch {args.batch}, "
        f"median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    bench_pairs()
    if args.pairs:
        return
    for shape in args.shapes:
        res = bench_shape(shape, args.batch, args.repeats, args.device, DTYPES[args.dtype])
        a, c = res["(a) published style"]["ms_per_step"], res["(c) engine=cached"]["ms_per_step"]
        e = res["(e) floor: final token, no hooks"]["ms_per_step"]
        d = res["(d) cached, 8 lambdas, per mask"]["ms_per_step"]
        e8 = res[f"(e') floor at 8x the batch, per {args.batch}"]["ms_per_step"]
        print(f"\n## {shape} {SHAPES[shape][:5]} (layers, heads, kv heads, hidden, mlp)")
        print("| variant | ms/step | ms/example | peak MB | vs (c) |\n|---|---|---|---|---|")
        for name, row in res.items():
            print(
                f"| {name} | {row['ms_per_step']:.1f} | {row['ms_per_example']:.2f} | {row['peak_mb']:.0f} | "
                f"{row['ms_per_step'] / c:.2f}x |"
            )
        print(
            f"(c) is {a / c:.1f}x faster than (a) [target >= 8]; (c)/(e) = {c / e:.2f} [target <= 1.15]; "
            f"(d) is {c / d:.2f}x cheaper per mask than (c) [target >= 1.8]; the floor itself gains "
            f"{e / e8:.2f}x from an 8x batch, the most batching can give here"
        )


if __name__ == "__main__":
    main()
