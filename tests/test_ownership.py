"""A run owns its directory: nothing mixed, nothing overwritten; odd input is one line, not a traceback.

The two ownership cases run real concurrent `circuitfind` processes."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuitfind.progress import progress
from circuitfind.records.rundir import holder, owned

from conftest import CLI_THREADS, REPO, run_cli, train_error

SMOKE = ("+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false")
LONG = ("optimizer.steps=200", "optimizer.eval_every=100")


def popen(args, cwd: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("circuitfind")
    env = {**os.environ, "OMP_NUM_THREADS": CLI_THREADS}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [str(exe), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]


@pytest.mark.e2e
def test_two_runs_started_together_get_two_directories(tmp_path):
    runs = [popen(["train", *SMOKE, *LONG, *extra], tmp_path) for extra in ((), ("optimizer.lam=0.3",))]
    for proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    dirs = sorted(p.parent for p in (tmp_path / "outputs" / "train").glob("*/*/circuit.json"))
    assert len(dirs) == 2, "each run in its own directory"
    for run in dirs:
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 200
    lams = sorted(json.loads((run / "circuit.json").read_text())["lam"] for run in dirs)
    assert lams == [0.05, 0.3]


@pytest.mark.e2e
def test_a_second_run_into_a_directory_in_use_stops_with_one_line(tmp_path):
    run = tmp_path / "run"
    first = popen(["train", *SMOKE, *LONG, f"hydra.run.dir={run}"], tmp_path)
    deadline = time.monotonic() + 120
    while holder(run) is None:  # the first run holds the directory
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    second = popen(["train", *SMOKE, *LONG, "optimizer.lam=0.3", f"hydra.run.dir={run}"], tmp_path)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 1
    (line,) = errors(err)
    assert "is in use by another circuitfind run (pid" in line and "give another hydra.run.dir" in line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 200
    assert json.loads((run / "circuit.json").read_text())["lam"] == 0.05
    assert "optimizer.lam=0.3" not in (run / "train.log").read_text()


def test_the_lock_is_held_for_the_block_and_released_after(tmp_path):
    run = tmp_path / "run"
    assert holder(run) is None
    with owned(run):
        assert holder(run) == os.getpid()
        with pytest.raises(Exception, match="is in use by another circuitfind run"), owned(run):
            pass
    assert holder(run) is None


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished default run on the organism, made by the command."""
    root = tmp_path_factory.mktemp("finished")
    res = run_cli(
        "train", "+desiderata=vd_oi", "progress=false", "plots=false", f"hydra.run.dir={root / 'run'}", cwd=root
    )
    assert res.returncode == 0, res.stderr
    return root / "run"


@pytest.mark.e2e
def test_eval_of_another_circuit_never_lands_in_the_run(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    own = (run / "eval.json").read_text()
    res = run_cli("eval", str(run), "circuit=[L2.H1]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (run / "eval.json").read_text() == own and not (run / "eval.1.json").exists()
    (elsewhere,) = (tmp_path / "outputs" / "eval").glob("*/*/eval.json")
    assert json.loads(elsewhere.read_text())["circuit"] == ["L2.H1"]
    assert "is not the circuit" in res.stderr + res.stdout and "report:" in res.stdout
    refused = run_cli("eval", "+desiderata=vd_oi", "circuit=[L0.H0]", "--out", str(run), cwd=tmp_path)
    assert refused.returncode == 1
    (line,) = errors(refused.stderr)
    assert "holds a finished run whose circuit is" in line and (run / "eval.json").read_text() == own


@pytest.mark.e2e
def test_eval_of_the_runs_own_circuit_keeps_the_earlier_evaluation_and_report_says_what_it_replaces(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    own = (run / "eval.json").read_text()
    res = run_cli("eval", str(run), "evaluate.ablations=[mean]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (run / "eval.1.json").read_text() == own
    assert set(json.loads((run / "eval.json").read_text())["ablations"]) == {"patching", "mean"}
    out = res.stdout + res.stderr
    assert "kept as eval.1.json" in out and f"report: {run / 'report.html'}, {run / 'report.md'}" in res.stdout
    assert "vd_transfer" in out, "the log gives the transfer splits too"
    again = run_cli("report", str(run), cwd=tmp_path)
    assert again.returncode == 0 and "replacing the earlier report.html and report.md" in again.stdout


@pytest.mark.e2e
def test_a_corrupt_or_foreign_mask_is_one_line(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "mask.safetensors").write_bytes((run / "mask.safetensors").read_bytes()[:100])  # truncated
    for args in ((str(run),), ("+desiderata=vd_oi", f"circuit={run / 'mask.safetensors'}")):
        res = run_cli("eval", *args, cwd=tmp_path)
        assert res.returncode == 1
        (line,) = errors(res.stderr)
        assert "is not a readable mask file" in line and "truncated or corrupt" in line


@pytest.mark.e2e
def test_a_residual_runs_mask_under_the_default_units_names_the_units(tmp_path):
    run = tmp_path / "residual"
    assert (
        run_cli(
            "train",
            *SMOKE,
            "units=residual",
            'units.positions=[x,"xname#2",last]',
            f"hydra.run.dir={run}",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    res = run_cli("eval", *SMOKE, f"circuit={run / 'mask.safetensors'}", cwd=tmp_path)
    (line,) = errors(res.stderr)
    assert "evaluate it with units=residual 'units.positions=[x,\"xname#2\",last]'" in line and "model=" not in line


BAD = {
    "a character the tokenizer lacks": (
        ('task.template="{xname} ≈ {x}\\n{yname} = {y}\\n{xname} {op} {yname} = "',),
        "the tokenizer cannot represent '≈' (U+2248)",
    ),
    "an emoji": (('task.template="{xname} = {x} 🙂\\n{yname} = {y}\\n{xname} {op} {yname} = "',), "U+1F642"),
    "a unicode minus": (('task.template="{xname} = {x}\\n{yname} = {y}\\n{xname} − {yname} = "',), "U+2212"),
    "lambda nan": (("optimizer.lam=nan",), "optimizer.lam=nan is not a finite number"),
    "lambda inf": (("optimizer.lam=inf",), "optimizer.lam=inf is not a finite number"),
    "a lambda of lams inf": (("optimizer.lams=[0.1,inf]",), "optimizer.lams[1]=inf is not a finite number"),
    "learning rate nan": (("optimizer.lr=nan",), "optimizer.lr=nan is not a finite number"),
    "constraints nothing satisfies": (
        ('task.constraints=["answer > 1000"]',),
        "no problem of the train split satisfies the constraints ['answer > 1000']",
    ),
    "tolerance above 1": (("prune.tolerance=2",), "prune.tolerance=2.0 must lie in [0, 1]"),
    "validation split too small": (("task.n_validation=3",), "task.n_validation=3 is too few pairs to prune on"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_odd_input_is_one_line(case):
    overrides, message = BAD[case]
    line = train_error("+desiderata=vd_oi", "progress=false", *overrides)
    assert line is not None and message in line, line


@pytest.mark.e2e
def test_odd_input_leaves_no_directory_behind(tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "train", "+desiderata=vd_oi", 'task.constraints=["answer > 1000"]', f"hydra.run.dir={run}", cwd=tmp_path
    )
    (line,) = errors(res.stderr)
    assert res.returncode == 1 and "no problem of the train split" in line and not run.exists()


def test_a_circuit_that_reaches_nothing_and_too_few_pairs_are_said(tmp_path, caplog):
    from circuitfind.records.circuit import read_record
    from circuitfind.runs.train import run_search

    from conftest import compose

    with caplog.at_level(logging.WARNING):
        run_search(compose(*SMOKE, "optimizer.lam=1000", "task.n_test=5", "prune=none"), tmp_path / "run")
    warnings = read_record(tmp_path / "run").warnings
    assert any("reaches none of its desiderata" in w for w in warnings)
    assert any("rest on 5 pairs per split" in w for w in warnings)
    assert "reaches none of its desiderata" in caplog.text


def test_progress_off_a_terminal_is_a_few_log_lines(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file, not a terminal
    with caplog.at_level(logging.INFO, logger="circuitfind.progress"), progress(100, "mask") as advance:
        for _ in range(100):
            advance(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "circuitfind.progress"]
    assert len(lines) == 10 and lines[-1].startswith("mask: 100/100 steps")
    assert "\r" not in sys.stderr.getvalue()


@pytest.mark.e2e
def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path):
    res = run_cli(
        "train",
        "+desiderata=vd_oi",
        "experiment=smoke",
        "progress=true",
        "plots=false",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert (
        res.returncode == 0
        and "\r" not in res.stderr
        and "mask: 10/10 steps" in (tmp_path / "r" / "train.log").read_text()
    )


def fake_torch(tmp_path: Path) -> dict:
    """An environment in which importing torch fails: what runs there never imported it."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    return {"PYTHONPATH": f"{fake}:{REPO}"}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, expected",
    [
        (("--help",), "usage: circuitfind"),
        (("train", "--help"), "optimizer: adam"),
        (("eval", "--help"), "usage: circuitfind eval"),
        (("report", "--help"), "usage: circuitfind report"),
        (("optimum", "--help"), "usage: circuitfind optimum"),
        (("organism", "--help"), "organism is powered by Hydra"),
        (("train", "optimizer.lamm=1"), "Key 'lamm' not in 'OptimizerConfig'"),
        (("train", "dataset=paper"), "dataset= is now task="),
        (("frobnicate",), "unknown command"),
    ],
)
def test_help_and_usage_errors_come_before_torch(args, expected, tmp_path):
    res = run_cli(*args, cwd=tmp_path, env=fake_torch(tmp_path))
    assert expected in res.stdout + res.stderr, res.stderr[-1500:]
    assert "torch was imported" not in res.stderr
