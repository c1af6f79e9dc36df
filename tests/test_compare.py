"""`circuitfind compare`: runs side by side by relative depth, each unit's attention, effect alone and role,
each circuit's faithfulness, and bad input as one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from circuitfind.apps.compare import main as compare_main
from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.roles import (
    INHIBITION,
    MOVER,
    NEGATIVE_MOVER,
    RoleSlots,
    Thresholds,
    final_token_masses,
    judge,
    mean_ablated,
    role_slots,
)
from circuitfind.model.space import Unit
from circuitfind.records.comparison import read_runs
from circuitfind.runs.job import Job
from circuitfind.runs.train import run_search
from circuitfind.task.library import load_desiderata, load_task

from conftest import compose

QUIET = ("+desiderata=vd_oi", "progress=false", "plots=false")
PLANTED = ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]
IOI = RoleSlots("io", ("io",), ("s", "s2"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The default run on the organism (4 layers: its pruned circuit is the planted one) and a smoke run
    on the random tiny LLaMA (2 layers; DBM finds nothing in random weights, single-unit patching keeps
    its top 3), both of the arithmetic task."""
    root = tmp_path_factory.mktemp("compare")
    run_search(compose(*QUIET), root / "organism")
    run_search(compose(*QUIET, "experiment=smoke", "method=single_patch", "method.k=3"), root / "tiny")
    return root


@pytest.fixture(scope="module")
def compared(runs):
    out = runs / "out"
    compare_main([str(runs / "organism"), str(runs / "tiny"), "--out", str(out), "--candidates", "2"])
    return json.loads((out / "compare.json").read_text())


def test_units_line_up_by_relative_depth_with_their_figures_and_faithfulness(compared, runs):
    organism, tiny = compared["runs"]
    assert (organism["letter"], organism["model"], organism["n_layers"]) == ("A", "organism", 4)
    assert (tiny["model"], tiny["n_layers"]) == ("tiny_llama", 2)
    units = {u["unit"]: u for u in organism["units"]}
    assert sorted(u for u in units if units[u]["in_circuit"]) == sorted(PLANTED)
    assert all(units[u]["depth"] == 0.5 for u in PLANTED)  # layer 2 of 4
    assert {u["depth"] for u in tiny["units"]} <= {0.0, 0.5}  # layers 0 and 1 of 2: layer 1 lines up with layer 2 of 4
    assert compared["slots"] == {"desideratum": "vd", "moved": ["x"], "distractor": []}
    candidates = [u for u in organism["units"] if not u["in_circuit"]]
    assert candidates and all(u["candidate_for"] == ["x"] for u in candidates)
    # the candidates are the 2 heads that attend most to x: no other head listed attends more
    ranked = [u for u in organism["units"] if u["candidate_for"]]
    others = [u for u in organism["units"] if not u["candidate_for"] and u["kind"] == "head"]
    assert len(ranked) == 2 and min(u["attention"]["x"] for u in ranked) >= max(u["attention"]["x"] for u in others)
    # patched alone from the VD alternates, each planted head moves d towards the alternate's answer
    for name in PLANTED:
        effect = units[name]["effect"]["splits"]["vd_test"]
        assert effect["logit_diff"]["ci"][0] > 0 and effect["share"] > 0.05, name
        assert units[name]["effect"]["objective_change"] < 0, name  # it lowers the held-out objective alone
    # faithfulness: patching as the run's eval.json has it, mean ablation computed (the run evaluated patching only)
    ev = json.loads((runs / "organism" / "eval.json").read_text())["ablations"]["patching"]["splits"]["vd_test"]
    assert (
        organism["faithfulness"]["patching"]["vd_test"]["sufficiency/faithfulness"] == ev["sufficiency"]["faithfulness"]
    )
    assert organism["faithfulness_source"] == {"patching": "eval.json", "mean": "computed"}
    assert organism["notes"] == []  # the same pairs as the run's (data fingerprint), and nothing left out
    mean = organism["faithfulness"]["mean"]["vd_test"]
    assert mean["necessity/task_acc_drop"]["value"] > 0.5  # ablating the planted heads takes most answers away
    for run in compared["runs"]:  # the roles as the rule gives them from the recorded figures
        for u in run["units"]:
            effect = u["effect"]["splits"]["vd_test"]
            reads = u["kind"] == "head" and u["attention"]["x"] >= 0.3
            moves = effect["share"] >= 0.05 and effect["logit_diff"]["ci"][0] > 0
            assert (u["role"] == MOVER) == (reads and moves), (run["letter"], u["unit"])
        assert compared["by_role"][MOVER][run["letter"]] == [u["unit"] for u in run["units"] if u["role"] == MOVER]


def test_a_head_that_does_not_read_the_moved_slot_is_no_mover_however_large_its_effect(compared, runs, tmp_path):
    """The organism's planted heads carry x's value but attend to x little (it reaches them through other
    tokens): the rule gives them no role, and says which figure fell short. With the attention threshold
    at 0 the same figures make them movers: the rule follows the evidence, it does not know the model."""
    units = {u["unit"]: u for u in compared["runs"][0]["units"]}
    shy = [u for u in PLANTED if units[u]["attention"]["x"] < 0.3]
    assert shy, "a planted head reads x directly now; choose another case"
    for name in shy:
        assert units[name]["role"] is None and "attention to x" in units[name]["evidence"]
    compare_main([str(runs / "organism"), "--out", str(tmp_path), "--min-attention", "0"])
    lowered = {u["unit"]: u for u in json.loads((tmp_path / "compare.json").read_text())["runs"][0]["units"]}
    assert all(lowered[u]["role"] == MOVER for u in PLANTED)


def test_the_table_prints_the_runs_side_by_side(runs, capsys, tmp_path):
    compare_main([str(runs / "organism"), str(runs / "tiny"), "--out", str(tmp_path), "--ablations", "patching"])
    out = capsys.readouterr().out
    assert "| A | organism | 4 x 8 |" in out and "| B | tiny_llama | 2 x 4 |" in out
    assert "| role | A: organism | B: tiny_llama |" in out
    assert "| 0.50 | A L2.H1* |" in out  # a circuit unit, by depth
    assert (tmp_path / "compare.md").read_text() in out


def rule(**figures):
    """judge() on one head at `last` with IOI's slots and the given figures (an effect share with a matching
    interval, attention by slot, an inhibition change)."""
    share = figures.get("share", 0.0)
    effect = {"share": share, "logit_diff": {"value": share, "ci": figures.get("ci", [share - 0.01, share + 0.01])}}
    attention = {"io": figures.get("io", 0.0), "s": figures.get("s", 0.0), "s2": figures.get("s2", 0.0)}
    change = figures.get("inhibition")
    inhibition = None if change is None else {"change": {"value": change, "ci": [change - 0.01, change + 0.01]}}
    unit = figures.get("unit", Unit(5, 1, 1))
    return judge(unit, attention, effect, inhibition, figures.get("slots", IOI), Thresholds())


def test_the_role_rule_at_its_thresholds():
    assert rule(io=0.5, share=0.2)[0] == MOVER
    assert rule(io=0.3, share=0.05, ci=[0.01, 0.1])[0] == MOVER  # both thresholds are inclusive
    assert rule(io=0.29, share=0.2)[0] is None  # reads the name too little
    assert rule(io=0.5, share=0.2, ci=[-0.1, 0.4])[0] is None  # an effect not told from zero
    assert rule(io=0.5, share=0.04)[0] is None
    assert rule(io=0.7, share=-0.19)[0] == NEGATIVE_MOVER
    assert rule(s=0.1, s2=0.6, share=0.0, inhibition=-0.08)[0] == INHIBITION  # s and s2 add up
    assert rule(s2=0.6, inhibition=-0.02)[0] is None  # the movers barely notice
    assert rule(s2=0.6, inhibition=0.08)[0] is None  # the wrong way
    role, evidence = rule(s2=0.6)
    assert role is None and "no mover in a later layer" in evidence
    assert rule(io=0.5, share=0.2, unit=Unit(5, 9, None, "mlp"))[0] is None  # roles are for heads
    assert rule(io=0.5, share=0.2, unit=Unit(5, 1, 1, position="s2"))[0] is None  # ... at the final token
    role, evidence = rule(io=0.5, share=0.2, slots=None)
    assert role is None and "no role is judged" in evidence


def test_role_slots_come_from_the_task_and_its_desiderata():
    ioi = load_task("ioi")
    assert role_slots(ioi, load_desiderata("ioi", ioi)) == IOI  # contrast s, and s2 = {expr: s}
    arithmetic = load_task("arithmetic")
    assert role_slots(arithmetic, load_desiderata("vd_oi", arithmetic)) == RoleSlots("vd", ("x",), ())
    only_oi = [d for d in load_desiderata("vd_oi", arithmetic) if d.name == "oi"]
    assert role_slots(arithmetic, only_oi) is None  # nothing moves the answer: no role is judged


def test_mean_ablating_a_head_changes_the_attention_of_later_layers_only():
    """The inhibition test's intervention: a head at the final token set to its reference mean moves the
    attention of the heads after it and leaves the heads before it bit for bit."""
    job = Job(compose(*QUIET))
    prompts = [pair.base for pair in job.data["vd"].test][:16]
    heads = [(1, h) for h in range(8)] + [(3, h) for h in range(8)]
    groups = [("x",), ("y",)]
    clean = final_token_masses(job.model, job.encoder, job.task, prompts, heads, groups)
    unit = job.space.index(["L2.H1"])[0]
    patched = mean_ablated(job.sites, job.space, job.reference(), unit)
    ablated = final_token_masses(job.model, job.encoder, job.task, prompts, heads, groups, patched)
    assert torch.equal(clean[:8], ablated[:8])  # layer 1 runs before the head
    assert (clean[8:] - ablated[8:]).abs().max() > 1e-3  # layer 3 reads it


def test_bad_input_is_one_line_naming_the_fix(runs, tmp_path):
    with pytest.raises(CircuitfindError, match="is not a directory; give finished run directories"):
        read_runs([tmp_path / "missing"])
    with pytest.raises(CircuitfindError, match="holds no finished run"):
        read_runs([tmp_path])
    with pytest.raises(CircuitfindError, match="given twice"):
        read_runs([runs / "organism", runs / "organism"])
    other = shutil.copytree(runs / "tiny", tmp_path / "other")
    record = json.loads((other / "circuit.json").read_text())
    record["data"]["task"] = "retrieval"  # a run of another task, as its record says
    (other / "circuit.json").write_text(json.dumps(record))
    with pytest.raises(CircuitfindError, match="compare runs of one task") as e:
        read_runs([runs / "organism", other])
    assert "\n" not in str(e.value) and "task 'retrieval'" in str(e.value)
    with pytest.raises(CircuitfindError, match="--ablations ablate"):
        compare_main([str(runs / "organism"), "--ablations", "ablate"])


@pytest.mark.e2e
def test_the_command_prints_one_line_for_a_path_that_is_not_a_run(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    res = cli("compare", str(tmp_path / "empty"))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "holds no finished run" in res.stderr
