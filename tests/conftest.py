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


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `circuitfind` console script; an env value of None unsets it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": None, **(env or {})}
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
