"""Baselines, faithfulness curves, optimality, stability, exports and the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from circuitfind.errors import CircuitfindError
from circuitfind.evaluation.curves import curve_sizes, faithfulness_curve, prefix_masks
from circuitfind.evaluation.evidence import jaccard, stability
from circuitfind.methods.baselines import attribution_scores, single_masks, single_patch_scores, top_k_mask
from circuitfind.methods.objective import objective_of_masks
from circuitfind.runs.optimum import check_size, feasible_k, n_subsets
from circuitfind.runs.train import Job

from conftest import compose

SMOKE = ("+desiderata=vd_oi", "experiment=smoke", "progress=false")


@pytest.fixture(scope="module")
def job():
    return Job(compose(*SMOKE))


def test_single_patch_scores_are_the_objective_improvement(job):
    objectives, shape = job.objectives(), job.space.shape
    scores = single_patch_scores(job.engine, objectives, job.device)
    ones = torch.ones(1, *shape)
    for flat in (0, 3, 7):
        mask = single_masks(shape, "cpu")[flat : flat + 1]
        expected = objective_of_masks(job.engine, objectives, ones) - objective_of_masks(job.engine, objectives, mask)
        assert torch.allclose(scores.flatten()[flat], expected[0], atol=1e-6)
        assert (mask == 0).sum() == 1


def test_attribution_is_the_first_order_estimate(job):
    objectives, shape = job.objectives(), job.space.shape
    scores = attribution_scores(job.engine, objectives, job.device)
    ones = torch.ones(1, *shape)
    # move one weight a little below 1: the change is -eps * gradient. The units with the largest
    # gradients: a change of 1e-6 (unit 1's at eps 1e-3) is float32 rounding of J, and differs across CPUs
    eps = 1e-2
    for flat in scores.flatten().abs().argsort(descending=True)[:2].tolist():
        bumped = ones.clone().view(-1)
        bumped[flat] -= eps
        change = objective_of_masks(job.engine, objectives, bumped.view(1, *shape)) - objective_of_masks(
            job.engine, objectives, ones
        )
        assert torch.allclose(-change[0] / eps, scores.flatten()[flat], rtol=0.02, atol=1e-5)


def test_attribution_leaves_out_the_terms_whose_loss_is_flat_at_w_1(job):
    """OI's loss is quadratic in the effect, zero at w = 1: its gradient there adds nothing, so its passes are
    not run, and the scores equal the gradient of every term."""
    from circuitfind.methods.objective import objective_value

    objectives = job.objectives()
    sloped = [o for o in objectives if not o.desideratum.flat_when_unpatched]
    assert all(o.desideratum.loss != "delta_squared" for o in sloped)
    assert 0 < len(sloped) < len(objectives)
    runs = []
    embed = job.model.get_input_embeddings().register_forward_hook(lambda m, a, out: runs.append(1))
    with embed:
        scores = attribution_scores(job.engine, objectives, job.device)
    assert len(runs) == sum(len(o.batches) for o in sloped)
    mask = torch.ones(1, *job.space.shape, requires_grad=True)
    objective_value(job.engine, objectives, mask).sum().backward()
    assert torch.allclose(scores, mask.grad[0], atol=1e-5, rtol=0)


def test_top_k_and_prefix_masks():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, -1.0, 0.3]])
    assert top_k_mask(scores, 2).tolist() == [[1, 0, 1], [0, 1, 1]]
    assert curve_sizes(36) == [0, 1, 2, 5, 10, 20, 36] and curve_sizes(1640)[-3:] == [500, 1000, 1640]
    masks = prefix_masks(torch.tensor([4, 0, 2, 1, 3, 5]), [0, 1, 3, 6], (2, 3))
    assert [(m == 0).sum().item() for m in masks] == [0, 1, 3, 6] and masks[1].view(-1)[4] == 0


def test_faithfulness_curve_ends_at_full_effect(job):
    splits = [s for s in job.eval_splits() if s.name == "vd_test"]
    order = torch.randperm(job.space.n_components, generator=torch.Generator().manual_seed(0))
    curve = faithfulness_curve(order, splits, job.engine)
    values = curve["curve"]["vd_test/logit_diff_norm"]
    assert curve["sizes"][0] == 0 and curve["sizes"][-1] == job.space.n_components
    assert abs(values[0]) < 1e-5 and abs(values[-1] - 1) < 1e-4  # nothing patched: no effect; all: the full effect
    assert curve["ranked_by"] == "signed score" and "vd_test/acc" in curve["auc"]


def test_stability_counts_and_jaccard():
    st = stability({0: ["a", "b"], 1: ["a", "c"], 2: ["a", "b"]}, ["a", "b", "c", "d"])
    assert st["frequency"] == {"a": 1.0, "b": 2 / 3, "c": 1 / 3}
    assert st["mean_pairwise_jaccard"] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert jaccard(set(), set()) == 1.0


def test_optimum_refuses_searches_that_cannot_finish():
    assert n_subsets(36, 4) == 1 + 36 + 630 + 7140 + 58905
    assert feasible_k(1640, 500_000) == 1
    with pytest.raises(CircuitfindError, match=r"1640 components up to size 4 means [\d,]+ subsets.*use --k 1"):
        check_size(1640, 4, 500_000)


def test_baseline_methods_write_the_same_outputs(cli, tmp_path):
    for method in ("single_patch", "attribution", "random"):
        run = tmp_path / method
        res = cli("train", *SMOKE, f"method={method}", "method.k=3", f"hydra.run.dir={run}")
        assert res.returncode == 0, res.stderr
        result = json.loads((run / "circuit.json").read_text())
        assert result["method"]["name"] == method and result["n_patched"] == 3
        assert (run / "mask.safetensors").is_file() and (run / "mib" / "importances.json").is_file()
    res = cli("train", *SMOKE, "method=single_patch", "method.k=0", f"hydra.run.dir={tmp_path / 'bad'}")
    assert res.returncode == 1 and "needs a circuit size" in res.stderr


def chromium_dom(html_path):
    """The page as headless Chromium renders it, with a count of images that failed to load."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium not installed (apt-get install chromium)")
    probe = html_path.with_name("probe.html")
    check = (
        "<script>window.addEventListener('load',()=>{const bad=[...document.images].filter("
        "i=>!i.complete||i.naturalWidth===0).length;document.body.setAttribute('data-broken',bad);"
        "document.body.setAttribute('data-images',document.images.length);});</script>"
    )
    probe.write_text(html_path.read_text().replace("</body>", check + "</body>"))
    out = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={html_path.parent / 'chr'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout


def test_evidence_optimum_report_and_exports(cli, tmp_path):
    run = tmp_path / "run"
    res = cli(
        "train",
        *SMOKE,
        "evidence=full",
        "evidence.stability_seeds=2",
        "evidence.random_draws=2",
        "optimizer.lam=0",
        "optimizer.lr=0.3",
        f"hydra.run.dir={run}",
    )
    assert res.returncode == 0, res.stderr
    evidence = json.loads((run / "evidence.json").read_text())
    result = json.loads((run / "circuit.json").read_text())
    k = result["n_patched"]
    assert evidence["dbm_size"] == k and k in evidence["sizes"]
    methods_at_k = {r["method"] for r in evidence["comparison"] if r["k"] == k}
    assert methods_at_k == {"dbm", "single_patch", "attribution", "random"}
    dbm_row = next(r for r in evidence["comparison"] if r["method"] == "dbm" and r["k"] == k)
    assert dbm_row["vd_test/acc"] == pytest.approx(result["metrics"]["vd_test/acc"])
    assert set(evidence["curves"]) == {"dbm", "single_patch", "attribution", "random"}
    assert evidence["stability"]["seeds"] == [0, 1] and (run / "faithfulness.png").is_file()

    mib = json.loads((run / "mib" / "importances.json").read_text())
    assert set(mib["nodes"]) == {f"a{layer}.h{h}" for layer in range(2) for h in range(4)} | {"m0", "m1"}
    assert sum(n["in_graph"] for n in mib["nodes"].values()) == k
    hooks = json.loads((run / "transformerlens.json").read_text())["circuit"]
    assert len(hooks) == k and all(
        h["hook"] in (f"blocks.{h['name'][1]}.attn.hook_z", f"blocks.{h['name'][1]}.hook_mlp_out") for h in hooks
    )

    opt = cli("optimum", str(run), "--k", "2")
    assert opt.returncode == 0, opt.stderr
    optimum = json.loads((run / "optimum.json").read_text())
    assert optimum["best_by_size"]["2"]["subsets"] == 45
    if optimum["gap"] is not None:
        assert optimum["gap"] >= -1e-6  # nothing beats the exhaustive best
    too_big = cli("optimum", str(run), "--k", "4", "--max-subsets", "100")
    assert too_big.returncode == 1 and "386 subsets" in too_big.stderr and "use --k 2" in too_big.stderr

    rep = cli("report", str(run))
    assert rep.returncode == 0, rep.stderr
    html = (run / "report.html").read_text()
    for section in ("summary", "runs", "baselines", "curves", "stability", "optimality"):
        assert f'id="{section}"' in html
    assert 'id="sweep"' not in html, "one run is one point: no figure over lambda"
    assert "Command: circuitfind train " in html and "<details><summary>composed config" in html
    assert 'src="data:image/png;base64,' in html and "Not computed" not in html
    assert (run / "report.md").read_text().startswith("# circuitfind report")
    if optimum["gap"] is None:  # the circuit is larger than the k searched: said, not left blank
        assert "the search stopped at k=2, below the circuit's size" in (run / "report.md").read_text()
    dom = chromium_dom(run / "report.html")
    assert 'data-broken="0"' in dom and 'data-images="' in dom and 'data-images="0"' not in dom
    for section in ("summary", "baselines", "curves", "stability", "optimality"):
        assert f'id="{section}"' in dom


def test_report_of_a_directory_without_a_finished_run(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    res = cli("report", str(tmp_path / "empty"))
    assert res.returncode == 1 and "holds no finished run" in res.stderr
