"""The model organism: training, the shipped checkpoint, DBM on it, and bad input."""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

import circuitfind.apps.organism  # noqa: F401  (registers the organism schema)
import circuitfind.apps.train  # noqa: F401  (registers the train schema)
from circuitfind.apps.organism import run_organism
from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.model.checkpoint import ASSET_DIR, load_checkpoint
from circuitfind.model.loading import load_model
from circuitfind.organism.data import Encoder
from circuitfind.organism.evaluate import exact_match
from circuitfind.organism.train import validate
from circuitfind.runs.train import run_search

TINY = [
    "model.n_layers=2",
    "model.n_heads=2",
    "model.hidden=16",
    "model.intermediate=32",
    "optim.steps=60",
    "optim.batch_size=32",
    "optim.warmup=5",
    "optim.lr=0.01",
    "dataset.variants_start=20",
    "iit.start=30",
    "iit.ramp=10",
    "iit.batch_size=8",
    "iit.circuit=[L1.H0]",
    "iit.strict=1.0",
    "n_eval=10",
    "dbm_lams=[]",
    "log_every=10",
    "progress=false",
]


def organism_cfg(overrides):
    with initialize_config_module(config_module="circuitfind.configs", version_base="1.3"):
        return compose(config_name="organism", overrides=overrides)


def train_cfg(overrides):
    with initialize_config_module(config_module="circuitfind.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_training_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    cfg = organism_cfg(TINY + [f"out_dir={tmp_path / 'ckpt'}"])
    result = run_organism(cfg, tmp_path)
    history = result["history"]
    assert history[-1]["lm"] < 0.8 * history[0]["lm"]
    assert {"vd", "oi", "strict"} <= set(history[-1])  # the interchange losses ran
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert model.config.circuitfind["planted_circuit"] == ["L1.H0"]
    assert tokenizer("x = 12\n", add_special_tokens=False)["input_ids"] == tokenizer.convert_tokens_to_ids(
        list("x = 12\n")
    )
    assert "L1.H0" in (tmp_path / "ckpt" / "README.md").read_text()
    assert json.loads((tmp_path / "ckpt" / "organism.json").read_text())["accuracy"].keys() == {"add", "sub", "mul"}


def test_init_starts_from_a_checkpoint_and_the_card_says_so(tmp_path):
    first = tmp_path / "first"
    run_organism(organism_cfg(TINY + [f"out_dir={first}"]), tmp_path / "a")
    start = AutoModelForCausalLM.from_pretrained(first)
    steps = ["optim.steps=1", "optim.lr=1e-9", "optim.warmup=1", "iit.start=0", "iit.ramp=0"]
    run_organism(organism_cfg(TINY + steps + [f"init={first}", f"out_dir={tmp_path / 'second'}"]), tmp_path / "b")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    moved = max((p - q).abs().max().item() for p, q in zip(start.parameters(), tuned.parameters()))
    assert moved < 1e-4, "one step at lr 1e-9 leaves the initial weights where they were"
    card = (tmp_path / "second" / "README.md").read_text()
    assert f"steps from `{first}`" in card and f"- Started from `{first}`, made by `circuitfind organism" in card


@pytest.mark.parametrize(
    "init, words",
    [("organism", "set model.* to the checkpoint's shape"), ("/nonexistent/ckpt", "/nonexistent/ckpt")],
)
def test_init_that_does_not_fit_is_one_line(tmp_path, init, words):
    with pytest.raises(CircuitfindError, match=words) as e:
        run_organism(organism_cfg(TINY + [f"init={init}", f"out_dir={tmp_path / 'ckpt'}"]), tmp_path)
    assert "\n" not in str(e.value) and not (tmp_path / "ckpt").exists()


def test_shipped_organism_answers_heldout_prompts():
    """Guards the shipped file: >= 99% exact match on 200 held-out prompts per operation."""
    model, tokenizer = load_checkpoint(None)
    meta = model.config.circuitfind
    cfg = OmegaConf.merge(organism_cfg([]), {"seed": meta["seed"], "dataset": meta["dataset"]})
    dist = validate(cfg)  # the held-out split the organism was trained without
    enc = Encoder(tokenizer, dist.template)
    rng = random.Random(0)
    for op in dist.ops:
        prompts = {}  # 200 distinct held-out prompts in the training mix of forms
        while len(prompts) < 200:
            p = dist.form(rng.choice(dist.test_pool(op)), rng)
            prompts[p.render(dist.template)] = p
        assert exact_match(model, enc, list(prompts.values())) >= 0.99, op


def test_the_organism_is_the_default_model():
    cfg = train_cfg(["+desiderata=vd_oi"])
    assert cfg.model.kind == "organism" and cfg.model.name_or_path is None  # the copy shipped in the package


def test_the_default_run_finds_the_planted_circuit(tmp_path, caplog):
    """`circuitfind train +desiderata=vd_oi` as shipped: the issue's bar on the default model."""
    cfg = train_cfg(["+desiderata=vd_oi", "progress=false", "plots=false"])
    with caplog.at_level(logging.INFO):
        run_search(cfg, tmp_path)
    result = json.loads((tmp_path / "circuit.json").read_text())
    metrics, baseline = result["metrics"], result["baseline"]
    assert metrics["vd_test/acc"] >= baseline["vd_test/acc_unpatched"] + 0.5
    assert metrics["vd_test/acc"] >= 0.9 and metrics["oi_test/acc"] >= 0.9
    assert result["fraction_patched"] <= 0.25
    assert result["planted"]["recall"] == 1.0 and result["planted"]["precision"] >= 0.5
    assert "against the circuit planted in the model" in caplog.text


@pytest.fixture
def copied_organism(tmp_path):
    path = tmp_path / "organism"
    shutil.copytree(ASSET_DIR, path)
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_checkpoint_file_is_named_with_the_fix(copied_organism, name):
    (copied_organism / name).unlink()
    with pytest.raises(CircuitfindError) as e:
        load_model(ModelConfig(kind="organism", name_or_path=str(copied_organism)))
    message = str(e.value)
    assert f"{name} is missing" in message and "circuitfind organism" in message and "\n" not in message


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_corrupt_checkpoint_file_is_named_with_the_fix(copied_organism, name):
    file = copied_organism / name
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(CircuitfindError) as e:
        load_checkpoint(str(copied_organism))
    message = str(e.value)
    assert f"{name} is corrupt" in message and "circuitfind organism" in message and "\n" not in message


@pytest.mark.parametrize(
    "override, words",
    [
        ("dataset.ops=[]", "dataset.ops is empty"),
        ("dataset.ranges.mul.y=[9,2]", "dataset.ranges.mul"),
        ("dataset.ops=[add,pow]", "unknown operations"),
        ("iit.circuit=[L7.H0]", "L7.H0"),
        ("iit.ramp=-1", "iit.ramp=-1"),
        ("iit.alone=-1", "loss weights"),
        ("iit.alone=1 iit.alone_positions=[last]", "not the circuit's own position"),
        ("iit.alone=1 iit.alone_positions=[y]", "iit.alone_positions"),
        ("iit.alone_units=0", "iit.alone_units=0"),
    ],
)
def test_impossible_organism_config_fails_before_training(tmp_path, monkeypatch, override, words):
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(CircuitfindError, match=words):
        run_organism(organism_cfg(TINY + override.split() + [f"out_dir={tmp_path / 'ckpt'}"]), tmp_path)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.e2e
def test_cli_reports_an_impossible_config_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "circuitfind.cli", "organism", "dataset.ops=[]", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == "circuitfind: error: dataset.ops is empty; give at least one operation, e.g. [add, sub, mul]"
    )


def test_x_positions_are_the_digits_of_x_in_every_prompt_form():
    """The alone term patches units at x's value: the tokens it names must spell x, whatever the names,
    order or distractor of the prompt."""
    from circuitfind.model.builtin import build_char_tokenizer
    from circuitfind.organism.interchange import Organism

    dist = validate(organism_cfg(TINY))
    enc = Encoder(build_char_tokenizer(), dist.template)
    org = Organism(model=None, sites=None, enc=enc, dist=dist, position="xname#2")
    rng = random.Random(0)
    problems = [dist.form(dist.sample(rng), rng) for _ in range(200)]
    assert len({(p.names, p.y_first, p.distractor is not None) for p in problems}) > 4, "every form is drawn"
    ids, _ = enc.prompts(problems)
    digits = org.tokens(problems, ids.shape[1], "x")
    for problem, row, toks in zip(problems, ids, digits):
        assert enc.tokenizer.decode(row[toks]).replace(" ", "") == str(problem.x), problem


def test_the_alone_term_trains_and_the_card_reports_its_weakest_unit(tmp_path):
    alone = ["iit.alone=1.0", "iit.alone_units=2", 'iit.position="xname#2"']
    cfg = organism_cfg(TINY + alone + [f"out_dir={tmp_path / 'ckpt'}"])
    result = run_organism(cfg, tmp_path)
    assert "alone" in result["history"][-1]
    assert set(result["alone"]) == {"x", "last"} and set(result["alone"]["x"]) == {"add", "sub", "mul"}
    worst = result["alone"]["last"]["add"]
    assert worst["unit"].startswith("L") and 0.0 <= worst["kept"] <= 1.0
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "- alone (weight 1.0)" in card and "alone at `x`" in card


def test_a_unit_patched_alone_from_its_own_prompt_changes_nothing():
    """Patching each unit alone from a copy of the base itself leaves the logits as they were, so the
    alone term moves the answer only through the alternate's values; from another x, a unit at x does
    move them (on the shipped positional organism, L0.H6 at x carries most of x)."""
    from circuitfind.model.builtin import build_char_tokenizer
    from circuitfind.model.components import locate_components
    from circuitfind.organism.interchange import Interchange, Organism, final_logits

    dist = validate(organism_cfg([]))
    model, _ = load_checkpoint(None, asset="organism_positional")
    org = Organism(
        model.eval(), locate_components(model), Encoder(build_char_tokenizer(), dist.template), dist, "xname#2"
    )
    units = list(org.sites.space.units())
    with torch.no_grad():
        pairs = Interchange(org, ["add"], ["add", "sub"], 6, random.Random(0))
        clean = final_logits(model, pairs.base_ids, pairs.base_attn)
        moved = pairs.alone_logits(org, "x", units).view(len(units), 6, -1)
        assert (moved - clean).abs().amax(dim=(1, 2)).max() > 1.0, "another x moves the logits"
        pairs.vd_alts, pairs.vd_ids, pairs.vd_attn = pairs.bases, pairs.base_ids, pairs.base_attn
        for position in ("x", "last"):
            patched = pairs.alone_logits(org, position, units).view(len(units), 6, -1)
            assert torch.allclose(patched, clean.expand_as(patched), atol=1e-4)
