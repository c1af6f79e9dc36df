"""Sweeps through Hydra launchers, and resuming an interrupted sweep with the same command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from circuitfind.apps.train import finished_records
from circuitfind.records.circuit import CircuitRecord, write_record
from circuitfind.records.rundir import clear_outputs

SMOKE = ("+desiderata=vd_oi", "experiment=smoke", "progress=false", "plots=false")
needs_submitit = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("hydra_plugins.hydra_submitit_launcher"),
    reason="hydra-submitit-launcher not installed",
)
needs_joblib = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("hydra_plugins.hydra_joblib_launcher"),
    reason="hydra-joblib-launcher not installed",
)


def hydra_cfg(cli, *overrides: str) -> dict:
    res = cli("train", *SMOKE, *overrides, "--cfg", "hydra")
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)["hydra"]


@needs_submitit
def test_submitit_local_two_job_lambda_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    quick = (
        "optimizer.steps=2",
        "optimizer.eval_every=2",
        "task.n_train=9",
        "task.n_test=9",
        "task.n_transfer=0",
    )
    args = ("-m", "optimizer.lam=0.02,0.1", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}")
    res = cli("train", *SMOKE, *quick, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(sweep.glob("*/circuit.json"))
    assert [p.parent.name for p in jobs] == ["0_lam=0.02", "1_lam=0.1"]
    assert [json.loads(p.read_text())["lam"] for p in jobs] == [0.02, 0.1]
    assert list((sweep / ".submitit").iterdir()), "the jobs went through submitit"
    for job in jobs:  # each job set its own torch threads to 1
        assert "torch threads for this job: 1" in (job.parent / "train.log").read_text()
    assert [r["lam"] for r in json.loads((sweep / "sweep_summary.json").read_text())] == [0.02, 0.1]


def test_submitit_slurm_config_has_the_cluster_settings(cli):
    h = hydra_cfg(
        cli,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.timeout_min=240",
        "hydra.launcher.mem_gb=128",
    )
    launcher = h["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"], launcher["mem_gb"]) == (
        "gpu",
        2,
        240,
        128,
    )
    assert h["callbacks"]["job_threads"]["_target_"] == "circuitfind.apps.callbacks.JobThreads"
    assert h["callbacks"]["job_threads"]["num_threads"] == "${hydra.launcher.cpus_per_task}"
    assert "sweep_summary" in h["callbacks"], "the sweep summary still runs"


@needs_joblib
def test_joblib_config_runs_one_thread_jobs(cli):
    h = hydra_cfg(cli, "hydra/launcher=joblib")
    assert h["launcher"]["_target_"].endswith("JoblibLauncher") and h["launcher"]["n_jobs"] == 2
    assert h["callbacks"]["job_threads"]["num_threads"] == 1


def test_job_threads_callback_sets_torch_threads():
    import torch

    from circuitfind.apps.callbacks import JobThreads

    before = torch.get_num_threads()
    try:
        JobThreads(num_threads=1).on_job_start(config=OmegaConf.create({}))
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def write_complete_record(out_dir, lam: float) -> None:
    empty = dict(method={}, metrics={}, baseline={}, planted=None, warnings=[], model={}, data={})
    record = CircuitRecord([], 0, 36, 0.0, lam, **empty, desiderata={}, optimizer={}, engine={})
    write_record(out_dir, record)


def finished(run_dir, cfg) -> bool:
    return finished_records(run_dir, cfg) is not None


def test_finished_needs_every_lambda_result(tmp_path):
    cfg = OmegaConf.create({"optimizer": {"lam": 0.1, "lams": [0.1, 0.2]}})
    for lam in ("0.1", "0.2"):
        (tmp_path / f"lam={lam}").mkdir()
    write_complete_record(tmp_path / "lam=0.1", 0.1)
    assert not finished(tmp_path, cfg)
    (tmp_path / "lam=0.2" / "circuit.json").write_text('{"status": "comp')  # torn write: not finished
    assert not finished(tmp_path, cfg)
    (tmp_path / "lam=0.2" / "circuit.json").write_text('{"status": "complete"}')  # not a whole record
    assert not finished(tmp_path, cfg)
    write_complete_record(tmp_path / "lam=0.2", 0.2)
    assert finished(tmp_path, cfg)
    single = OmegaConf.create({"optimizer": {"lam": 0.1, "lams": None}})
    assert not finished(tmp_path, single)


def test_clear_outputs_keeps_only_hydra_files(tmp_path):
    for name in (".hydra/config.yaml", "metrics.jsonl", "mask_last_good.safetensors", "lam=0.1/metrics.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "train.log").write_text("log")
    clear_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "train.log"]


@pytest.mark.e2e
def test_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    """Kill a three-job sweep while its second job trains; the same command then finishes it."""
    sweep = tmp_path / "sweep"
    exe = Path(sys.executable).with_name("circuitfind")
    args = [str(exe), "train", *SMOKE, "optimizer.steps=40", "optimizer.eval_every=40", "-m"]
    args += ["optimizer.lam=0.01,0.02,0.03", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    first, second = sweep / "0_lam=0.01", sweep / "1_lam=0.02"
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ((first / "circuit.json").exists() and (second / "metrics.jsonl").exists()):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the second job never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep we started, and its children
        proc.wait()
    assert not (second / "circuit.json").exists(), "killed while the second job was unfinished"
    done = (first / "circuit.json").read_bytes()
    done_mtime = (first / "circuit.json").stat().st_mtime_ns

    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (first / "circuit.json").read_bytes() == done and (first / "circuit.json").stat().st_mtime_ns == done_mtime
    assert "skipping finished job 0_lam=0.01" in (first / "train.log").read_text()
    for job in ("1_lam=0.02", "2_lam=0.03"):
        assert json.loads((sweep / job / "circuit.json").read_text())["status"] == "complete"
        rows = (sweep / job / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == list(range(40)), "re-run from scratch, not appended"
    assert [r["lam"] for r in json.loads((sweep / "sweep_summary.json").read_text())] == [0.01, 0.02, 0.03]
