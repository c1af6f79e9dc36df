"""The seams of the package: one circuit.json schema, names from the configured desiderata, light imports."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys

import pytest

from circuitfind.errors import CircuitfindError
from circuitfind.model.space import ComponentSpace
from circuitfind.records.circuit import CircuitRecord, headline_metrics, read_record, write_record
from circuitfind.runs.train import run_search

from conftest import compose


def test_the_record_round_trips_and_a_stranger_file_is_one_line(tmp_path):
    empty = dict(method={"name": "dbm"}, metrics={"vd_test/acc": 1.0}, baseline={}, planted=None, warnings=[])
    record = CircuitRecord([], 0, 36, 0.0, 0.05, **empty, model={}, data={}, desiderata={}, optimizer={}, engine={})
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record
    assert (tmp_path / "circuit.json").read_text().lstrip().startswith('{\n  "status": "complete"')
    (tmp_path / "circuit.json").write_text('{"lam": 0.1}')
    with pytest.raises(CircuitfindError, match="is not a circuitfind record") as e:
        read_record(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(CircuitfindError, match="no readable circuit.json"):
        read_record(tmp_path / "missing")


def test_every_unit_has_its_names():
    space = ComponentSpace(n_layers=2, n_heads=3, head_dim=4)
    units = list(space.units())
    assert [u.name for u in units] == space.names() == [
        "L0.H0", "L0.H1", "L0.H2", "L0.MLP", "L1.H0", "L1.H1", "L1.H2", "L1.MLP"
    ]  # fmt: skip
    head, mlp = units[5], units[7]
    assert (head.mib_node, head.transformerlens) == (
        "a1.h1",
        {"hook": "blocks.1.attn.hook_z", "head": 1, "position": "last"},
    )
    assert (mlp.mib_node, mlp.transformerlens) == (
        "m1",
        {"hook": "blocks.1.hook_mlp_out", "head": None, "position": "last"},
    )
    assert space.index(["L1.MLP", "L0.H2"]) == [mlp, units[2]]
    with pytest.raises(CircuitfindError, match=r"unknown unit\(s\) L5.H0"):
        space.index(["L5.H0"])


def test_loading_a_model_does_not_import_the_organism_training_code():
    code = (
        "import sys; from circuitfind.model.loading import load_model; from circuitfind.config.schema import ModelConfig; "
        "load_model(ModelConfig(kind='organism')); "
        "print(sorted(m for m in sys.modules if m.startswith('circuitfind.organism')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_new_desideratum_names_every_metric_summary_and_log_line(tmp_path, caplog):
    # A user's own desideratum, written as data only: Value Dependence under another name.
    terms = "desiderata.terms=[{name: xv, title: Extra VD, vary: [x], weight: 5.0, with_sparsity: true}]"
    common = ("+desiderata=vd", "experiment=smoke", "progress=false", terms)
    with caplog.at_level(logging.INFO):
        records = run_search(compose(*common, "optimizer.lams=[0.0,0.1]"), tmp_path / "sweep")
    assert {k.split("/")[0] for k in records[0].metrics} == {"xv_test", "xv_transfer", "continuous"}
    assert records[0].evaluated == ["xv"] and records[0].titles == {"xv": "Extra VD"}
    with open(tmp_path / "sweep" / "sweep_summary.csv") as f:
        header = next(csv.reader(f))
    assert header == ["lam", "n_patched", *headline_metrics(["xv"]), "run_dir"]
    assert "held-out XV acc" in caplog.text and "XV transfer" in caplog.text
    evidence_run = compose(*common, "evidence.baselines=[random]", "evidence.ks=[1]", "plots=true")
    run_search(evidence_run, tmp_path / "evidence")
    row = read_record(tmp_path / "evidence").metrics
    assert "xv_test/acc" in row and not any(k.startswith("vd") for k in row)
    assert (tmp_path / "evidence" / "curves.png").is_file()


def test_a_run_made_before_tasks_is_refused_with_one_line(tmp_path):
    from circuitfind.records.rundir import load_config

    empty = dict(method={"name": "dbm"}, metrics={}, baseline={}, planted=None, warnings=[])
    old = {"dataset": {"template": "x = {x}\ny = {y}\nx {op} y = "}, "seed": 0}
    record = CircuitRecord([], 0, 36, 0.0, 0.05, **empty, model={}, data={}, desiderata={}, optimizer={}, engine={})
    record.config = old
    write_record(tmp_path, record)
    with pytest.raises(CircuitfindError, match="made by circuitfind 0.1, whose `dataset` config is now `task`"):
        load_config(tmp_path)


def test_every_config_choice_has_exactly_one_implementation():
    """The config layer names the choices (config/choices.py); each implementation's registry has the same names."""
    from circuitfind.config import choices
    from circuitfind.methods.baselines import SCORERS
    from circuitfind.methods.registry import METHODS
    from circuitfind.model.engine import ENGINE_CLASSES

    assert list(METHODS) == choices.METHODS
    assert sorted(SCORERS) == sorted(choices.RANKING_METHODS)
    assert [name for name, m in METHODS.items() if m.learns_mask] == list(choices.SEARCH_METHODS)
    assert sorted(ENGINE_CLASSES) == sorted(choices.ENGINES)
    assert set(choices.NEEDS_REFERENCE) < set(choices.ABLATIONS)
    assert choices.shipped("units") == sorted(choices.UNIT_KINDS)


def test_the_config_layer_imports_nothing_above_it():
    code = (
        "import sys; import circuitfind.config.validation, circuitfind.config.compose; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('circuitfind.')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['config', 'errors', 'version']"  # version: the package's __init__
