"""`circuitfind compare <run> <run> ...`: the circuits of finished runs of one task, side by side.

  circuitfind compare outputs/ioi/smollm2 outputs/ioi/gemma3
  circuitfind compare <run> <run> --candidates 5 --ablations patching,mean,resample --out outputs/compare/ioi

Runs of different models line up by relative depth (layer / n_layers). For each run, on its own
held-out pairs: every circuit unit, and the --candidates heads that attend most to each slot the roles
read, with its attention from the final token by task slot, the effect of patching it alone from the
alternates, and its role where the evidence supports one (the rule: evaluation/roles.py, docs/ioi.md);
and each circuit's faithfulness under each ablation, read from the run's eval.json, or computed when it
lacks one. Prints the tables and writes compare.json and compare.md to --out.
"""

from __future__ import annotations

import argparse
import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from circuitfind.config.choices import ABLATIONS, LAST
from circuitfind.errors import CircuitfindError
from circuitfind.progress import log_lines
from circuitfind.records.circuit import RECORD_FILE
from circuitfind.records.comparison import CompareRun, comparison_tables, read_runs, write_comparison
from circuitfind.records.rundir import owned, unique_dir

if TYPE_CHECKING:  # torch and the model only once the arguments are good
    from circuitfind.evaluation.heldout import EvalSplit
    from circuitfind.evaluation.roles import RoleSlots, Thresholds
    from circuitfind.model.space import Unit
    from circuitfind.runs.job import Job
    from circuitfind.task.spec import Prompt

log = logging.getLogger("circuitfind.compare")


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="circuitfind compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (or sweeps) of one task")
    parser.add_argument("--out", type=Path, help="where compare.json goes (default outputs/compare/<date>/<time>)")
    parser.add_argument(
        "--candidates", type=int, default=3, help="heads outside the circuit shown per role slot group (default 3)"
    )
    parser.add_argument(
        "--ablations", default="patching,mean", help="ablation kinds of the faithfulness table (default patching,mean)"
    )
    parser.add_argument("--min-attention", type=float, default=0.3, help="role rule: attention to the slots")
    parser.add_argument("--min-share", type=float, default=0.05, help="role rule: |share| of the effect alone")
    parser.add_argument("--min-inhibition", type=float, default=0.05, help="role rule: drop of the movers' contrast")
    args = parser.parse_args(argv)
    args.ablations = [k.strip() for k in args.ablations.split(",") if k.strip()]
    unknown = [k for k in args.ablations if k not in ABLATIONS]
    if unknown or not args.ablations:
        raise CircuitfindError(f"--ablations {unknown[0] if unknown else '(none)'}: choose from {', '.join(ABLATIONS)}")
    if args.candidates < 0:
        raise CircuitfindError(f"--candidates {args.candidates}: give 0 or more")
    for name in ("min_attention", "min_share", "min_inhibition"):
        if not 0 <= getattr(args, name) <= 1:
            raise CircuitfindError(f"--{name.replace('_', '-')} {getattr(args, name)}: give a value in [0, 1]")
    return args


def main(argv: List[str]) -> None:
    args = parse(argv)
    runs = read_runs(args.runs)  # records only: bad input stops here, before torch and the models
    out_dir = args.out if args.out is not None else unique_dir(Path("outputs/compare"))
    if (out_dir / RECORD_FILE).is_file():
        raise CircuitfindError(f"--out {out_dir} is a run directory; give another --out (or none)")
    log_lines()
    from circuitfind.evaluation.roles import Thresholds

    thresholds = Thresholds(args.min_attention, args.min_share, args.min_inhibition)
    measured = []
    for run in runs:
        log.info(f"{run.label}: measuring {run.path}")
        measured.append(measure_run(run, thresholds, args.candidates, args.ablations))
        gc.collect()  # one model in memory at a time
    result = comparison(measured, thresholds)
    tables = comparison_tables(result)
    with owned(out_dir, "--out"):
        json_path, md_path = write_comparison(out_dir, result)
    print(tables, end="")
    print(f"\nwritten: {json_path}, {md_path}")


def comparison(measured: List[Dict[str, Any]], thresholds: Thresholds) -> Dict[str, Any]:
    """compare.json: what the runs share (task, slots, the rule) and each run's figures."""
    from circuitfind.evaluation.roles import ROLES

    first = measured[0]
    labels = [label for r in measured for u in r["units"] if u["attention"] for label in u["attention"]]
    by_role = {
        role: {r["letter"]: [u["unit"] for u in r["units"] if u["role"] == role] for r in measured} for role in ROLES
    }
    return {
        "task": first["task"],
        "desiderata": first["desiderata"],
        "moving_desideratum": first["moving_desideratum"],
        "split": first["split"],
        "slots": first["slots"],
        "thresholds": thresholds.as_dict(),
        "depth": "layer / n_layers",
        "roles": list(ROLES),
        "by_role": by_role,
        "attention_labels": list(dict.fromkeys(labels)),
        "runs": [{k: v for k, v in r.items() if k not in ("task", "desiderata", "slots")} for r in measured],
    }


def measure_run(run: CompareRun, thresholds: Thresholds, n_candidates: int, kinds: List[str]) -> Dict[str, Any]:
    """One run's units (its circuit and the candidate heads), their attention, effect alone and role, and its
    circuit's faithfulness, on the run's own held-out pairs."""
    from dataclasses import asdict

    from circuitfind.evaluation.attention import attention_by_slot
    from circuitfind.evaluation.roles import MOVER, effects_alone, judge, role_slots, slot_mass
    from circuitfind.runs.evaluate import run_config
    from circuitfind.runs.job import Job
    from circuitfind.task.desiderata import trained
    from circuitfind.task.pairs import data_fingerprint

    job = Job(run_config(run.path, []))
    space, task = job.space, job.task
    slots = role_slots(task, job.desiderata)
    moving = slots.desideratum if slots else trained(job.desiderata)[0].name
    splits = job.eval_splits()
    prompts = [pair.base for pair in job.data[moving].test]
    circuit = space.index(run.record.names)
    heads = [u for u in space.units() if u.kind == "head" and (u.position == LAST or u in circuit)]
    attention = attention_by_slot(
        job.model, job.encoder, task, prompts, [(u.layer, u.head) for u in heads], [u.position for u in heads],
        [u.name for u in heads],
    )  # fmt: skip
    listed, candidate_for = list(circuit), {}
    groups = [g for g in ((slots.moved, slots.distractor) if slots else ()) if g]
    at_last = [u for u in heads if u.position == LAST]
    for group in groups:
        for unit in sorted(at_last, key=lambda u: -slot_mass(attention[u.name], group))[:n_candidates]:
            candidate_for.setdefault(unit.name, []).append(", ".join(group))
            if unit not in listed:
                listed.append(unit)
    effects = {row["unit"]: row for row in effects_alone(splits, job.engine, space, listed, job.cfg.seed)}
    split = f"{moving}_test"

    def role_of(unit, inhibition=None):
        effect = effects[unit.name]["splits"][split]
        return judge(unit, attention.get(unit.name), effect, inhibition, slots, thresholds)

    movers = [u for u in listed if role_of(u)[0] == MOVER]
    inhibitions, notes = inhibition_tests(job, listed, movers, attention, slots, thresholds, prompts)
    units = []
    for unit in sorted(listed, key=lambda u: (u.layer, u.col)):
        role, evidence = role_of(unit, inhibitions.get(unit.name))
        units.append(
            {
                "unit": unit.name,
                "kind": unit.kind,
                "layer": unit.layer,
                "head": unit.head,
                "position": unit.position,
                "depth": run.depth(unit.layer),
                "in_circuit": unit in circuit,
                "candidate_for": candidate_for.get(unit.name, []),
                "attention": attention.get(unit.name),
                "effect": effects[unit.name],
                "inhibition": inhibitions.get(unit.name),
                "role": role,
                "evidence": evidence,
            }
        )
    faithfulness, source, faith_notes = circuit_faithfulness(job, run, splits, kinds)
    recorded = run.record.data.get("fingerprint")
    if recorded and recorded != data_fingerprint(job.data):
        notes.append(
            f"the pairs drawn now differ from the run's (data fingerprint {data_fingerprint(job.data)} against "
            f"{recorded}): the task's generator changed since the run, so these figures are not on its pairs"
        )
    out = {
        "letter": run.letter,
        "model": run.model,
        "run": str(run.path),
        "label": run.record.label,
        "n_layers": space.n_layers,
        "n_heads": space.n_heads,
        "circuit": run.record.names,
        "task": task.name,
        "desiderata": [d.name for d in trained(job.desiderata)],
        "moving_desideratum": moving,
        "split": split,
        "slots": asdict(slots) if slots else None,
        "n_prompts": len(prompts),
        "faithfulness": faithfulness,
        "faithfulness_source": source,
        "units": units,
        "notes": notes + faith_notes,
    }
    del job
    return out


def inhibition_tests(
    job: Job,
    listed: List[Unit],
    movers: List[Unit],
    attention: Dict[str, Dict[str, float]],
    slots: RoleSlots | None,
    thresholds: Thresholds,
    prompts: List[Prompt],
) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """The inhibition figures of the listed heads at `last` that read the distractor (evaluation/roles.py),
    and notes on what could not be tested."""
    from circuitfind.evaluation.roles import inhibition_effects, slot_mass

    if slots is None or not slots.distractor:
        return {}, []
    readers = [
        u
        for u in listed
        if u.kind == "head"
        and u.position == LAST
        and slot_mass(attention[u.name], slots.distractor) >= thresholds.attention
    ]
    if not readers:
        return {}, []
    if not movers:
        return {}, ["no mover among the listed heads: inhibition was not tested"]
    try:
        reference = job.reference()
    except CircuitfindError as e:
        return {}, [f"inhibition was not tested: {e}"]
    figures = inhibition_effects(
        job.model, job.encoder, job.task, prompts, job.sites, job.space, reference, readers, movers, slots, job.cfg.seed
    )
    return figures, []


def circuit_faithfulness(
    job: Job, run: CompareRun, splits: List[EvalSplit], kinds: List[str]
) -> Tuple[Dict[str, Any], Dict[str, str], List[str]]:
    """Each kind's faithfulness figures per split: from the run's eval.json, else computed now on its test
    splits (evaluation/circuit_tests.split_report); where each came from; notes on what could not be computed."""
    from circuitfind.config.choices import NEEDS_REFERENCE
    from circuitfind.evaluation.ablation import Ablation
    from circuitfind.evaluation.circuit_tests import split_report
    from circuitfind.records.circuit_source import read_circuit
    from circuitfind.records.comparison import faithfulness_figures, faithfulness_from_eval

    found = faithfulness_from_eval(run.path, run.record.names, kinds)
    source = {kind: "eval.json" for kind in found}
    notes: List[str] = []
    missing = [kind for kind in kinds if kind not in found]
    if missing and not run.record.names:
        notes.append("the circuit is empty: it has no faithfulness to compute")
        return {kind: found.get(kind, {}) for kind in kinds}, source | {k: "empty circuit" for k in missing}, notes
    if missing:
        under_test = read_circuit(str(run.path), job.space)
        seed = job.cfg.seed
        for kind in missing:
            try:
                ablation = Ablation(kind, job.reference() if kind in NEEDS_REFERENCE else None, seed)
            except CircuitfindError as e:  # too few reference prompts: the other kinds are still shown
                found[kind], source[kind] = {}, "not computed"
                notes.append(f"{kind} ablation not computed: {e}")
                continue
            found[kind] = {
                s.name: faithfulness_figures(split_report(s, job.engine, under_test, ablation, seed))
                for s in splits
                if s.kind == "test"
            }
            source[kind] = "computed"
    return {kind: found[kind] for kind in kinds}, source, notes
