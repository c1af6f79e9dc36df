"""Weights & Biases as its users expect: one step axis, names that identify runs, no hang without a network.

A fake `wandb` module records what circuitfind asks of W&B, so these run without a server.
"""

from __future__ import annotations

import sys
import time
import types

import pytest

from circuitfind.config.schema import LoggerConfig
from circuitfind.records.tracking import Tracker, log_sweep_summary, wandb_mode


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.defined: list[tuple] = []
        self.logged: list[tuple[dict, int | None]] = []
        self.summary: dict = {}
        self.exit_code = None

    def define_metric(self, name, **kwargs):
        self.defined.append((name, kwargs))

    def log(self, data, step=None):
        self.logged.append((data, step))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module = types.SimpleNamespace(
        init=init,
        Settings=lambda **kw: kw,
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
    )
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return runs


def test_every_metric_shares_the_step_axis_and_figures_land_on_the_last_step(fake_wandb, tmp_path):
    tracker = Tracker(
        tmp_path, LoggerConfig(backend="wandb"), {"seed": 0}, name="2026-11-25_18-24-28 dbm λ=0.05", group=None
    )
    for step in range(3):
        tracker.log({"vd_loss": 1.0 / (step + 1)}, step)
    tracker.image("mask_heatmap", tmp_path / "mask_heatmap.png")
    tracker.table("circuit", ["name"], [["L2.H1"]])
    tracker.close(failed=True)
    (run,) = fake_wandb
    assert ("step", {}) in run.defined and ("*", {"step_metric": "step"}) in run.defined
    assert [step for _, step in run.logged] == [0, 1, 2, 2, 2], "figures and tables at the final training step"
    assert all(data["step"] == step for data, step in run.logged)
    assert run.init["name"] == "2026-11-25_18-24-28 dbm λ=0.05" and run.exit_code == 1


def test_online_without_an_api_key_falls_back_to_offline_quickly(fake_wandb, monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    start = time.monotonic()
    assert wandb_mode("online") == "offline"
    assert time.monotonic() - start < 10 and "no API key" in caplog.text
    Tracker(tmp_path, LoggerConfig(backend="wandb", mode="online"), {}, name="r", group=None).close()
    assert fake_wandb[0].init["mode"] == "offline"


def test_wandb_mode_in_the_environment_is_respected(fake_wandb, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"
    Tracker(tmp_path, LoggerConfig(backend="wandb", mode="offline"), {}, name="r", group=None).close()
    assert fake_wandb[0].init["mode"] == "disabled"


def test_the_sweep_summary_is_logged_in_the_sweep_group(fake_wandb, tmp_path):
    sweep = tmp_path / "outputs" / "sweeps" / "2026-11-25" / "18-24-28"
    sweep.mkdir(parents=True)
    (sweep / "sweep_figure.png").write_bytes(b"png")
    log_sweep_summary(LoggerConfig(backend="wandb"), sweep, ["lam", "n_patched"], [[0.05, 5]])
    (run,) = fake_wandb
    assert run.init["group"] == str(sweep) and "2026-11-25" in run.init["group"]
    assert run.init["job_type"] == "sweep_summary"
    logged = {k for data, _ in run.logged for k in data}
    assert {"sweep_summary", "sweep_figure"} <= logged
    assert run.logged[0][0]["sweep_summary"] == ("table", ["lam", "n_patched"], [[0.05, 5]])
