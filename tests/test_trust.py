"""Runs you can trust: no stale or mixed results, one line instead of a traceback, figures that show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from circuitfind.records import plots

from conftest import compose

SMOKE = ("+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false")


def one_error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("circuitfind:"), res.stderr[-2000:]
    return lines[0]


def test_a_finished_sweep_is_resumed_only_with_the_same_config(cli, tmp_path):
    sweep = tmp_path / "sweep"
    args = ("train", *SMOKE, "-m", "optimizer.lam=0.02,0.1", f"hydra.sweep.dir={sweep}")
    assert cli(*args).returncode == 0
    records = {p: p.read_bytes() for p in sorted(sweep.glob("*/circuit.json"))}
    spec = (sweep / "multirun.yaml").read_text()
    for change, key in (("optimizer.steps=5", "optimizer.steps"), ("+desiderata=vd", "desiderata.name")):
        res = cli(*[a for a in args if not (change.startswith("+") and a.startswith("+desiderata"))], change)
        assert res.returncode == 1 and key in one_error_line(res) and "hydra.sweep.dir" in res.stderr
        assert {p: p.read_bytes() for p in records} == records and (sweep / "multirun.yaml").read_text() == spec
    again = cli(*args)
    assert again.returncode == 0 and {p: p.read_bytes() for p in records} == records
    assert "skipping finished job 0_lam=0.02" in (sweep / "0_lam=0.02" / "train.log").read_text()
    redo = cli(*args[:-1], "optimizer.steps=5", "overwrite=true", args[-1])
    assert redo.returncode == 0
    assert all(json.loads(p.read_text())["optimizer"]["steps"] == 5 for p in records)
    resumed = cli(*args[:-1], "optimizer.steps=5", args[-1])  # overwrite=true then, not now: the same results
    assert (
        resumed.returncode == 0 and "skipping finished job 1_lam=0.1" in (sweep / "1_lam=0.1" / "train.log").read_text()
    )


def test_a_run_owns_its_directory(cli, tmp_path):
    run = tmp_path / "run"
    assert (
        cli("train", *SMOKE, "evidence.baselines=[random]", "evidence.ks=[1]", f"hydra.run.dir={run}").returncode == 0
    )
    assert (run / "evidence.json").is_file()
    refused = cli("train", *SMOKE, "method=random", "method.k=2", f"hydra.run.dir={run}")
    assert (
        refused.returncode == 1
        and "already holds a run" in one_error_line(refused)
        and "overwrite=true" in refused.stderr
    )
    assert json.loads((run / "circuit.json").read_text())["method"]["name"] == "dbm"
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["method"]["name"] == "dbm"
    replaced = cli("train", *SMOKE, "method=random", "method.k=2", "overwrite=true", f"hydra.run.dir={run}")
    assert replaced.returncode == 0
    assert not (run / "evidence.json").exists(), "the earlier run's evidence is gone with it"
    assert json.loads((run / "circuit.json").read_text())["method"]["name"] == "random"


def test_bad_input_leaves_no_directory_behind(cli, tmp_path):
    res = cli("train", *SMOKE, "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 1 and "optimizer.lr=-1" in one_error_line(res)
    assert not (tmp_path / "run").exists()


def test_a_report_never_mixes_setups_under_one_header(cli, tmp_path):
    parent = tmp_path / "runs"
    assert cli("train", *SMOKE, f"hydra.run.dir={parent / 'a'}").returncode == 0
    assert cli("train", *SMOKE, "method=random", "method.k=2", f"hydra.run.dir={parent / 'b'}").returncode == 0
    assert cli("report", str(parent)).returncode == 0
    md = (parent / "report.md").read_text()
    assert "2 different setups" in md and "## Setup 1: vd_oi, dbm" in md and "## Setup 2: vd_oi, random" in md


def test_a_failed_sweep_job_still_gets_a_summary(cli, tmp_path):
    sweep = tmp_path / "sweep"
    res = cli("train", *SMOKE, "-m", "optimizer.lam=-1,0.05", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 1 and "1 sweep job(s) failed" in res.stderr and "0_lam=-1" in res.stderr
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["lam"] for r in rows] == [0.05]
    assert json.loads((sweep / "sweep_failed.json").read_text())[0]["run_dir"] == "0_lam=-1"
    assert "0_lam=-1: optimizer.lam=-1.0 is negative" in (sweep / "sweep_summary.md").read_text()


def test_sweeps_over_other_keys_name_their_jobs_and_columns(cli, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in SMOKE if not a.startswith("+desiderata")]
    res = cli("train", *args, "-m", "seed=0,1", "+desiderata=vd_oi,vd", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sweep: 4 of 4 jobs done" in res.stdout + res.stderr and "to go" in res.stdout  # progress, ETA
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [
        "0_seed=0,desiderata=vd_oi",
        "1_seed=0,desiderata=vd",
        "2_seed=1,desiderata=vd_oi",
        "3_seed=1,desiderata=vd",
    ]
    header = (sweep / "sweep_summary.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["seed", "desiderata", "lam"]
    lams = tmp_path / "lams"
    res = cli("train", *SMOKE, "optimizer.lams=[0.0,0.1]", "-m", "seed=0,1", f"hydra.sweep.dir={lams}")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((lams / "sweep_summary.json").read_text())
    assert sorted((r["seed"], r["lam"]) for r in rows) == [("0", 0.0), ("0", 0.1), ("1", 0.0), ("1", 0.1)]


def test_the_accuracy_curves_have_points():
    history = [{"step": s, "vd_loss": 1.0} | ({"vd_test/acc": 0.5} if s % 10 == 9 else {}) for s in range(30)]
    panels = dict(plots.curve_panels(history, {"vd": "Value Dependence", "oi": "Operation Invariance"}))
    assert len(panels["held-out accuracy (rounded mask)"]["vd_test/acc"]) == 3
    assert compose("+desiderata=vd_oi").optimizer.eval_every <= 10


def inside_figure(fig, texts) -> bool:
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    return all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in (t.get_window_extent(renderer) for t in texts))


def test_the_sweep_figure_has_points_on_integer_ticks_and_readable_lambda_labels():
    rows = [{"lam": lam, "n_patched": n, "vd_test/acc": 1.0, "oi_test/acc": 1.0, "vd_transfer/acc": 1.0}
            for lam, n in ((0.005, 6), (0.01, 6), (0.02, 6), (0.05, 5), (0.1, 5), (0.2, 4), (0.3, 3))]  # fmt: skip
    fig = plots.sweep_axes(rows, {"vd": "Value Dependence", "oi": "Operation Invariance"})
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [3, 4, 5, 6]
    lines = ax.get_lines()
    assert len({line.get_marker() for line in lines}) == len(lines) == 3
    assert all(float(x).is_integer() for line in lines for x in line.get_xdata()), "markers on their sizes"
    assert len({line.get_markersize() for line in lines}) == 3 and all(line.get_fillstyle() == "none" for line in lines)
    labels = ax.get_xticklabels()
    assert "λ=0.005,0.01,0.02" in labels[-1].get_text()
    assert all(label.get_rotation() == 0 and label.get_fontsize() >= 7 for label in labels)
    fig.canvas.draw()
    assert inside_figure(fig, labels), "no label runs off the figure"
    plots.plt.close(fig)


def test_unit_figures_keep_titles_apart_say_what_a_panel_sums_and_count_in_integers(tmp_path):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from circuitfind.model.space import ComponentSpace
    from circuitfind.records import unit_plots

    drawn: list = []
    original = unit_plots.save_figure
    unit_plots.save_figure = lambda path, fig: drawn.append(fig) or original(path, fig)
    try:
        heads = ComponentSpace(4, 8, 8, positions=("last", "x"))
        unit_plots.unit_heatmaps(
            np.full(heads.shape, 0.2), heads, ["last", "x"], tmp_path / "h.png", "a long title " * 4
        )
        neurons = ComponentSpace(4, 8, 8, kind="neurons", positions=("last",), group_size=16, mlp_width=64)
        unit_plots.neuron_counts(np.zeros(neurons.shape), neurons, tmp_path / "n.png", "neurons")
    finally:
        unit_plots.save_figure = original
    fig, counts = drawn
    assert isinstance(fig, Figure) and "summed over" in fig.axes[0].get_title()
    canvas = FigureCanvasAgg(fig)  # the figure was closed after saving: draw it again
    canvas.draw()
    renderer = canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    assert all(top.y0 >= ax.title.get_window_extent(renderer).y1 - 1 for ax in fig.axes if ax.get_title())
    assert all(float(t).is_integer() for t in counts.axes[0].get_yticks())


def test_a_baseline_needs_a_size_that_fits_and_logs_no_lambda(cli, tmp_path):
    missing = cli("train", *SMOKE, "method=single_patch", f"hydra.run.dir={tmp_path / 'a'}")
    assert missing.returncode == 1 and "needs a circuit size: method.k=<n>" in one_error_line(missing)
    too_big = cli("train", *SMOKE, "method=single_patch", "method.k=99", f"hydra.run.dir={tmp_path / 'b'}")
    assert too_big.returncode == 1 and "method.k=99 is more than the model's 10 components" in one_error_line(too_big)
    ok = cli("train", *SMOKE, "method=single_patch", "method.k=2", f"hydra.run.dir={tmp_path / 'c'}")
    assert ok.returncode == 0 and "single_patch k=2: circuit of 2 of 10 units" in ok.stderr + ok.stdout
    assert "raise method.k, or search other units" in ok.stdout, "a ranking's remedy is a larger k, not a lambda"
    assert "λ=" not in (tmp_path / "c" / "train.log").read_text()
    assert json.loads((tmp_path / "c" / "circuit.json").read_text())["lam"] is None


def test_a_typed_backslash_n_in_the_template_is_a_newline(cli, tmp_path):
    res = cli("train", *SMOKE, 'task.template="x = {x}\\ny = {y}\\nx {op} y = "', f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((tmp_path / "r" / "circuit.json").read_text())
    assert record["data"]["template"] == "x = {x}\ny = {y}\nx {op} y = "
    assert cli("train", *SMOKE, f"hydra.run.dir={tmp_path / 'p'}").returncode == 0
    assert (
        json.loads((tmp_path / "p" / "circuit.json").read_text())["data"]["fingerprint"]
        == record["data"]["fingerprint"]
    )


def test_too_many_pairs_says_how_many_the_ranges_allow(cli, tmp_path):
    res = cli("train", *SMOKE, "task.n_train=100000", f"hydra.run.dir={tmp_path / 'r'}")
    line = one_error_line(res)
    assert res.returncode == 1 and "task.n_train can be at most" in line


def test_a_typo_gets_the_nearest_key(cli, tmp_path):
    res = cli("train", *SMOKE, "optimizer.lamm=0.1")
    assert res.returncode == 1 and "did you mean optimizer.lam?" in one_error_line(res)


@pytest.mark.e2e
def test_organism_names_the_wrong_key(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "circuitfind.cli", "organism", "optim.steps=0", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1 and "optim.steps=0" in one_error_line(res)


def test_version_and_quiet_loading(cli, tmp_path):
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("circuitfind ")
    organism = ("+desiderata=vd_oi", "plots=false", "optimizer.steps=2", "task.n_transfer=0")
    loud = cli("train", *organism, f"hydra.run.dir={tmp_path / 'loud'}")
    # off a terminal, progress is log lines (stdout and train.log), and transformers' loading bar is off
    assert loud.returncode == 0 and "mask: 2/2 steps" in loud.stdout and "Loading weights" not in loud.stderr
    quiet = cli("train", *organism, "progress=false", f"hydra.run.dir={tmp_path / 'quiet'}")
    assert quiet.returncode == 0 and "mask:" not in quiet.stdout + quiet.stderr


def test_an_unwritable_run_directory_is_one_line(cli):
    res = cli("train", *SMOKE, "hydra.run.dir=/proc/circuitfind-test")
    assert res.returncode == 1 and "/proc/circuitfind-test" in one_error_line(res)


@pytest.mark.e2e
def test_ctrl_c_keeps_the_last_mask_and_says_where(tmp_path):
    run = tmp_path / "run"
    exe = Path(sys.executable).with_name("circuitfind")
    args = [str(exe), "train", *SMOKE, "optimizer.steps=100000", "optimizer.eval_every=1000", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    # A suite started in the background (`make test-all &`, nohup) ignores SIGINT, and its children
    # inherit that; the run under test gets the default, as a run in a terminal has.
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 2000):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a hang: say where the run was, for the next reader
        proc.kill()
        out, err = proc.communicate()
        log = (run / "train.log").read_text()[-1500:] if (run / "train.log").exists() else "no train.log"
        steps = len((run / "metrics.jsonl").read_text().splitlines())
        pytest.fail(f"no exit 60 s after Ctrl-C ({steps} steps logged); stderr: {err[-1500:]}; log: {log}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted at step" in lines[0], err[-2000:]
    assert torch.isfinite(load_file(run / "mask_last_good.safetensors")["continuous"]).all()


def test_the_python_api_returns_the_records(tmp_path, monkeypatch):
    from circuitfind import find_circuit
    from circuitfind.errors import CircuitfindError

    monkeypatch.chdir(tmp_path)
    records = find_circuit("+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false")
    (run,) = list((tmp_path / "outputs" / "api").glob("*/*"))
    saved = json.loads((run / "circuit.json").read_text())
    assert records[0].names == [row["name"] for row in saved["circuit"]] and records[0].metrics == saved["metrics"]
    with pytest.raises(CircuitfindError, match="already holds a run"):
        find_circuit("+desiderata=vd_oi", "experiment=smoke", "progress=false", run_dir=run)


def test_loading_problems_are_one_line_before_any_weight_is_read(cli, tmp_path):
    from test_cli import save_tiny_bloom, save_tiny_llama

    save_tiny_llama(tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated download
    save_tiny_llama(tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no_tokenizer" / name).unlink(missing_ok=True)
    save_tiny_bloom(tmp_path / "bloom")
    (tmp_path / "bloom" / "model.safetensors").unlink()  # refused from config.json alone
    cases = {
        "corrupt": ("model.name_or_path=" + str(tmp_path / "corrupt"), "corrupt or truncated"),
        "no_tokenizer": ("model.name_or_path=" + str(tmp_path / "no_tokenizer"), "has no tokenizer"),
        "bloom": ("model.name_or_path=" + str(tmp_path / "bloom"), "model family 'bloom' is not supported"),
        "offline hub id": ("model.name_or_path=nobody/no-such-model", "hub is offline"),
    }
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for case, (path, message) in cases.items():
        start = time.monotonic()
        res = cli("train", *SMOKE, "model=hf", path, f"hydra.run.dir={tmp_path / 'runs' / case}", env=env)
        assert res.returncode == 1 and message in one_error_line(res), (case, res.stderr[-2000:])
        assert time.monotonic() - start < 60, case


def test_evidence_and_optimum_label_their_progress(cli, tmp_path):
    run = tmp_path / "run"
    args = ("+desiderata=vd_oi", "experiment=smoke", "plots=false", "evidence.stability_seeds=2")
    res = cli("train", *args, f"hydra.run.dir={run}")
    assert res.returncode == 0 and "stability: seed 1" in res.stdout
    opt = cli("optimum", str(run), "--k", "1")
    assert opt.returncode == 0 and "optimum: subsets scored" in opt.stdout + opt.stderr


def test_tracking_runs_are_named_by_time_and_method(tmp_path):
    from circuitfind.runs.train import run_name

    run_dir = tmp_path / "outputs" / "train" / "2026-11-25" / "18-24-28"
    assert run_name(compose("+desiderata=vd_oi"), run_dir) == "2026-11-25_18-24-28 arithmetic dbm λ=0.05"
    lams = compose("+desiderata=vd_oi", "optimizer.lams=[0.01,0.1]")
    assert run_name(lams, run_dir / "0_lam=0.01").endswith("18-24-28_0_lam=0.01 arithmetic dbm λ=0.01,0.1")
    assert run_name(compose("+desiderata=vd_oi", "method=random", "method.k=3"), run_dir).endswith("random k=3")
