"""Testing any circuit: necessity, sufficiency, areas, minimality, intervals, sources, self-checks."""

from __future__ import annotations

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.ablation import Ablation
from circuitfind.evaluation.bootstrap import interval, resampled_means
from circuitfind.evaluation.circuit_tests import CONDITIONS, condition_statistic, undefined_areas
from circuitfind.evaluation.heldout import PairOutcomes
from circuitfind.evaluation.selfcheck import self_checks
from circuitfind.records.circuit import read_record
from circuitfind.records.circuit_source import read_circuit
from circuitfind.records.report import build_report
from circuitfind.runs.evaluate import evaluate_to
from circuitfind.runs.job import Job
from circuitfind.runs.train import Run, run_search

from conftest import compose

PLANTED = ["L2.H1", "L2.H3", "L2.H4", "L2.H6"]
QUIET = ("+desiderata=vd_oi", "progress=false", "plots=false")


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    """The paper's run on the organism (its rounded mask, unpruned), evaluated under every ablation kind."""
    run_dir = tmp_path_factory.mktemp("run") / "default"
    run_search(compose(*QUIET, "experiment=paper", "evaluate.ablations=[zero,mean,resample]"), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def job():
    return Job(compose(*QUIET))


def test_the_run_evaluates_its_circuit_and_minimality_flags_the_unit_that_helps_the_training_pairs_only(organism_run):
    ev = json.loads((organism_run / "eval.json").read_text())
    assert ev["circuit"] == sorted(PLANTED + ["L1.H2"])
    assert list(ev["ablations"]) == ["patching", "zero", "mean", "resample"]  # patching first, always
    assert ev["minimality"]["not_needed"] == ["L1.H2"]  # the exhaustive search: it helps the 50 training pairs only
    rows = {row["unit"]: row for row in ev["minimality"]["units"]}
    assert all(rows[u]["needed"] and rows[u]["objective_change"]["ci"][0] > 0 for u in PLANTED)
    vd = ev["ablations"]["patching"]["splits"]["vd_test"]
    assert vd["necessity"]["task_acc_drop"]["value"] == 1.0  # patching the circuit moves every answer
    assert 0 < vd["cpr"]["value"] < 1 and vd["cpr"]["value"] + vd["cmd"]["value"] == pytest.approx(1, abs=1e-4)
    assert vd["curve"]["faithfulness"][0] == 0 and vd["curve"]["faithfulness"][-1] == pytest.approx(1)


def test_every_figure_carries_an_interval_that_holds_its_value(organism_run):
    record = read_record(organism_run)
    assert set(record.metrics_ci) == set(record.metrics) and set(record.baseline_ci) == set(record.baseline)
    for key, (low, high) in record.metrics_ci.items():
        assert low - 1e-6 <= record.metrics[key] <= high + 1e-6, key
    ev = json.loads((organism_run / "eval.json").read_text())
    for kind in ev["ablations"].values():
        for split in kind["splits"].values():
            for condition in CONDITIONS:
                for figure in split[condition].values():
                    assert figure["ci"][0] - 1e-6 <= figure["value"] <= figure["ci"][1] + 1e-6


def test_bootstrap_intervals_narrow_with_more_pairs_and_repeat():
    coin = torch.arange(1000) % 2  # half hits
    widths = []
    for n in (50, 800):
        low, high = interval(partial(resampled_means, coin[:n]), n)
        widths.append(float(high - low))
        assert low < 0.5 < high
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) as wide
    same = PairOutcomes(
        torch.ones(1, 8, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool), torch.ones(1, 8), torch.ones(8)
    )
    assert same.intervals()["acc"].tolist() == [[1.0, 1.0]]
    assert (
        interval(lambda i: resampled_means(coin[:50], i), 50).tolist()
        == interval(lambda i: resampled_means(coin[:50], i), 50).tolist()
    )


def test_the_areas_are_undefined_where_patching_everything_does_not_move_the_logit_difference():
    # Rows: full, empty (d per pair). An invariance split: both about 5, the difference noise.
    noise = torch.randn(2, 60, generator=torch.Generator().manual_seed(0)) * 0.5
    reason = undefined_areas(torch.full((2, 60), 5.0) + noise, seed=0)
    assert reason is not None and "includes 0" in reason
    moved = torch.stack([torch.full((60,), -7.0), torch.full((60,), 6.0)]) + noise
    assert undefined_areas(moved, seed=0) is None


def test_a_resample_with_no_span_gives_areas_without_a_warning(recwarn):
    # Rows: full, empty, necessity, sufficiency, then the curve's inner points. Full = empty on every
    # pair: faithfulness is +-inf on the curve, and its areas NaN, with no numpy warning in the run's output.
    d = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [3.0, 3.0], [-1.0, -1.0]])
    per_pair = {"d": d, "task_hit": torch.ones_like(d), "hit": torch.ones_like(d)}
    statistic = condition_statistic(per_pair, "patching", 4, np.array([0.0, 0.25, 0.5, 1.0]))
    out = statistic(torch.tensor([[0, 1]]))
    assert torch.isnan(out["cpr"]).all() and torch.isnan(out["cmd"]).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_nothing_ablated_is_the_unpatched_model_under_every_ablation(job):
    """The full condition is the clean model whatever the ablation values; keeping every unit is the same."""
    splits = job.eval_splits()
    evaluation = job.circuit_evaluation(splits)
    evaluation.kinds = ["patching", "zero", "mean", "resample"]
    ev = evaluation(read_circuit(job.space.names(), job.space))
    by_name = {split.name: split for split in splits}
    for kind, ablation in ev["ablations"].items():
        for name, r in ablation["splits"].items():
            clean = float(torch.cat(by_name[name].d0).mean())
            assert r["full"]["logit_diff"]["value"] == pytest.approx(clean, abs=1e-4), (kind, name)
            for kept, same in (("sufficiency", "full"), ("necessity", "empty")):  # the same masks, rows apart
                assert r[kept]["logit_diff"]["value"] == pytest.approx(r[same]["logit_diff"]["value"], abs=1e-4)
    zero, mean = ev["ablations"]["zero"]["splits"]["vd_test"], ev["ablations"]["mean"]["splits"]["vd_test"]
    assert zero["empty"]["logit_diff"] != mean["empty"]["logit_diff"]  # the kinds ablate to different values


def test_ablation_values_are_zero_the_reference_mean_and_a_fixed_draw_of_reference_prompts(job):
    prep = job.prepared("vd", "test")[0]
    reference = job.reference()  # evaluate.min_reference=20
    heads, mlps = reference.values.points["heads"], reference.values.points["mlps"]
    assert reference.n_prompts == heads[0].shape[0] == len({p.base.text for dd in job.data.values() for p in dd.train})
    zero = Ablation("zero").values(prep)
    assert all(float(v.abs().max()) == 0 for layers in zero.points.values() for v in layers)
    mean = Ablation("mean", reference).values(prep)
    assert torch.allclose(mean.points["mlps"][1][3], mlps[1].mean(0), atol=1e-6)
    resample = Ablation("resample", reference, seed=0)
    first, again = resample.values(prep), resample.values(prep)
    assert torch.equal(first.points["heads"][2], again.points["heads"][2])  # one draw per batch, kept
    rows = [int((heads[2] == row).all(-1).nonzero()[0]) for row in first.points["heads"][2][:10]]
    assert len(set(rows)) > 3  # prompts drawn per pair, not one for all
    assert Ablation("patching").values(prep) is None  # the engine patches from the alternates


def test_a_circuit_by_names_from_a_mask_file_and_from_a_mib_file_is_the_same_circuit(organism_run, job):
    by_names = read_circuit(PLANTED + ["L1.H2"], job.space)
    from_run = read_circuit(str(organism_run), job.space)
    from_mask = read_circuit(str(organism_run / "mask.safetensors"), job.space)
    from_mib = read_circuit(str(organism_run / "mib" / "importances.json"), job.space)
    assert by_names.names == from_run.names == from_mask.names == from_mib.names
    assert by_names.scores is None
    assert torch.equal(from_mask.scores.argsort(), from_mib.scores.argsort())
    evaluation = job.circuit_evaluation(job.eval_splits())
    a, b = evaluation(by_names), evaluation(from_mib)
    vd_a, vd_b = a["ablations"]["patching"]["splits"]["vd_test"], b["ablations"]["patching"]["splits"]["vd_test"]
    assert vd_a["sufficiency"] == vd_b["sufficiency"] and a["minimality"] == b["minimality"]
    assert "cpr" in vd_b and "cpr" not in vd_a  # areas need a ranking; names give none


def test_circuitfind_eval_of_a_run_and_of_named_units(organism_run, cli, tmp_path):
    run = shutil.copytree(organism_run, tmp_path / "run")  # the shared run keeps its own eval.json
    res = cli("eval", str(run), "--n-test", "80", "evaluate.ablations=[zero]")
    assert res.returncode == 0, res.stderr
    ev = json.loads((run / "eval.json").read_text())
    assert ev["data"]["n_test"] == 80 and ev["ablations"]["zero"]["splits"]["vd_test"]["n_pairs"] == 80
    assert ev["metrics"]["vd_test/acc"] == 1.0 and ev["checks"]["results"]["cached_full"]["passed"]
    out = tmp_path / "named"
    res = cli("eval", *QUIET, f"circuit=[{','.join(PLANTED)}]", "--out", str(out))
    assert res.returncode == 0, res.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["circuit"] == PLANTED and ev["minimality"]["not_needed"] == []
    assert "#### Evaluation (eval.json)" in (out / "report.md").read_text()


def test_the_report_shows_the_evaluation_the_intervals_and_the_checks(organism_run):
    _, md_path = build_report(organism_run)
    md = md_path.read_text()
    assert "#### Evaluation (eval.json)" in md and "Not needed on held-out pairs: L1.H2." in md
    assert "95% interval" in md and "Self-checks passed on 4 pairs in float32" in md
    assert "| vd_test | necessity |" in md and "resample ablation" in md


@pytest.mark.parametrize(
    "circuit, message",
    [
        (["L2.H9", "L2.HI"], r"unknown unit\(s\) L2.H9 \(did you mean L2.H7, "),
        ([], "the circuit is empty"),
    ],
)
def test_bad_circuits_are_one_line(job, circuit, message):
    with pytest.raises(CircuitfindError, match=message) as e:
        read_circuit(circuit, job.space)
    assert "\n" not in str(e.value)


def test_a_mask_or_mib_file_of_another_model_is_one_line(job, tmp_path):
    save_file({"rounded": torch.ones(2, 5), "continuous": torch.ones(2, 5)}, str(tmp_path / "mask.safetensors"))
    with pytest.raises(CircuitfindError, match=r"shape \(2, 5\).*this model's is \(4, 9\)"):
        read_circuit(str(tmp_path / "mask.safetensors"), job.space)
    (tmp_path / "mib.json").write_text(json.dumps({"cfg": {"n_layers": 12, "n_heads": 12}, "nodes": {"a0.h0": {}}}))
    with pytest.raises(CircuitfindError, match="12 layers and 12 heads"):
        read_circuit(str(tmp_path / "mib.json"), job.space)


def test_too_few_reference_prompts_for_a_mean_ablation_stop_before_anything_is_written(tmp_path):
    cfg = compose(*QUIET, "task.n_train=4", "evaluate.ablations=[mean]")
    with pytest.raises(CircuitfindError, match="raise task.n_train to at least 20") as e:
        Run(Job(cfg))
    assert "\n" not in str(e.value)
    with pytest.raises(CircuitfindError, match="optimizer.path_lams.*raise task.n_train to at least 20"):
        Run(Job(compose(*QUIET, "task.n_train=4", "optimizer.path_lams=[0.01]")))  # its ranking needs the mean
    with pytest.raises(CircuitfindError, match="evaluate.ablations=.*unknown kind"):
        Job(compose(*QUIET, "evaluate.ablations=[mode]"))
    with pytest.raises(CircuitfindError, match="the circuit is empty"):
        evaluate_to(tmp_path / "out", list(QUIET), run=None, circuit=[])
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_circuit_and_names_eval(cli):
    res = cli("train", *QUIET, "circuit=[L2.H1]")
    assert res.returncode == 2 and "circuitfind eval" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_self_checks_are_recorded_and_can_be_skipped(organism_run):
    checks = read_record(organism_run).checks
    assert set(checks["results"]) == {"model", "keep_all", "patch_all", "cached_full", "cached_full_gradient"}
    assert all(r["passed"] for r in checks["results"].values())
    assert Run(Job(compose(*QUIET, "checks=false"))).checks == {"skipped": "checks=false"}


def broken(monkeypatch, what: str) -> None:
    """Break the engine in one of the ways other tools shipped broken."""
    from circuitfind.model import engine, hooks, readout

    if what == "cached_full":  # a prefix cache built from the wrong rows
        original = engine.CachedEngine._prefix_kv
        monkeypatch.setattr(
            engine.CachedEngine,
            "_prefix_kv",
            lambda self, pairs, offset: [(k.roll(1, 0), v.roll(1, 0)) for k, v in original(self, pairs, offset)],
        )
    elif what == "keep_all":  # a hook that moves values it should keep
        original_mix = hooks._mix
        monkeypatch.setattr(hooks, "_mix", lambda *args: original_mix(*args) * 1.001)
    elif what == "model":  # a wrapper whose logits are not the model's
        original_logits = readout.Readout.logits
        monkeypatch.setattr(
            readout.Readout, "logits", lambda self, h: original_logits(self, h) + 0.01 * h.sum(-1, keepdim=True)
        )


@pytest.mark.parametrize("what", ["cached_full", "keep_all", "model"])
def test_a_broken_engine_stops_the_run_with_one_line(job, monkeypatch, what):
    broken(monkeypatch, what)
    with pytest.raises(CircuitfindError, match=f"self-check {what}.* failed") as e:
        self_checks(job.engine, job.encoded[("vd", "train")])
    assert "\n" not in str(e.value) and "checks=false" in str(e.value)


def test_patching_that_changes_nothing_is_caught(job):
    """Alternates that are the base prompts themselves: patching everything must change something, and does not."""
    pairs = job.encoded[("vd", "train")]
    same = type(pairs)(**{**vars(pairs), "alt_ids": pairs.base_ids, "alt_attn": pairs.base_attn})
    with pytest.raises(CircuitfindError, match="self-check patch_all failed"):
        self_checks(job.engine, same)


def test_progress_false_silences_plain_tqdm_bars_made_while_the_model_loads(capsys):
    """The GGUF loader's bar is a plain tqdm made after tqdm was imported: TQDM_DISABLE is read too late."""
    from tqdm.auto import tqdm

    from circuitfind.runs.job import plain_tqdm_disabled

    with plain_tqdm_disabled(True):
        list(tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" not in capsys.readouterr().err
    list(tqdm(range(3), desc="afterwards"))
    assert "afterwards" in capsys.readouterr().err


def test_evaluate_circuit_from_python(tmp_path):
    from circuitfind import evaluate_circuit

    ev = evaluate_circuit(*QUIET, circuit=PLANTED, out_dir=tmp_path / "planted")
    assert ev["ablations"]["patching"]["splits"]["vd_test"]["necessity"]["task_acc_drop"] == {
        "value": 1.0,
        "ci": [1.0, 1.0],
    }
    assert ev["minimality"]["not_needed"] == [] and (tmp_path / "planted" / "eval.json").is_file()
