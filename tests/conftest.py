"""Shared fixtures: tiny models built in code, a config composer, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests never talk to a W&B server, and child processes use one thread each so that
# parallel workers do not fight over the 2 cores.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


# Threads of each circuitfind process a test starts: 1 by default (two workers share 2 cores);
# CIRCUITFIND_TEST_THREADS=2 checks that the suite passes with another thread count too.
CLI_THREADS = os.environ.get("CIRCUITFIND_TEST_THREADS", "1")


def pytest_collection_modifyitems(items):
    """A test that starts a `circuitfind` process is an end-to-end test: `make test-all` runs it."""
    for item in items:
        if "cli" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `circuitfind` console script; an env value of None unsets it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": CLI_THREADS, "HYDRA_FULL_ERROR": None, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    exe = Path(sys.executable).with_name("circuitfind")
    return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    """`cli(*args)` runs circuitfind in a fresh directory; outputs land under tmp_path."""
    return lambda *args, **kw: run_cli(*args, cwd=tmp_path, **kw)


def compose(*overrides: str):
    """The train config as the CLI would build it, for in-process tests."""
    from circuitfind.config.compose import compose_train_config

    return compose_train_config(list(overrides))


def train_error(*overrides: str) -> str | None:
    """The one line `circuitfind train <overrides>` prints before it writes anything, or None when it
    would run: the CLI's own override checks, composition, validation, data, model and preparation,
    in this process (tests/test_cli.py keeps end-to-end cases that the line is what the command prints)."""
    from circuitfind.cli import check_train_overrides, error_line
    from circuitfind.runs.job import Job
    from circuitfind.runs.train import Run

    try:
        check_train_overrides(list(overrides))
        Run(Job(compose(*overrides)))
    except Exception as e:
        line = error_line(e, list(overrides))
        if line is None:
            raise
        assert "\n" not in line, line
        return line
    return None


def arithmetic_desideratum(name: str):
    """The paper's `vd` or `oi` on the arithmetic task."""
    from circuitfind.task.library import load_desiderata, load_task

    return {d.name: d for d in load_desiderata("vd_oi", load_task("arithmetic"))}[name]


def arithmetic_pairs(tok, name: str = "vd", n: int = 12, padded: bool = False, seed: int = 1):
    """n encoded pairs of the paper's task; padded: prompts of several lengths (one- and two-digit y,
    names of one or two letters, distractor lines), so the batch is left-padded."""
    from circuitfind.task.encoding import PairEncoder
    from circuitfind.task.library import load_desiderata, load_task, sample_pairs

    overrides = {"slots": {"op": {"values": ["+"]}}}  # one operation: prompts of one length
    if padded:
        overrides = {
            "slots": {"op": {"values": ["+", "*"]}, "y": {"range": [2, 99]}},
            "variants": {"names": {"values": [["x", "y"], ["ab", "c"]]}, "distractor": {"p": 0.5}},
        }
    task = load_task("arithmetic", overrides)
    des = {d.name: d for d in load_desiderata("vd_oi", task)}[name]
    return PairEncoder(tok).encode(sample_pairs(task, des, n, seed), des)
