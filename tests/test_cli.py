"""The command line end to end: outputs, multirun sweep summary, W&B offline, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

from circuitfind.config.schema import ModelConfig
from circuitfind.model.builtin import build_char_tokenizer
from circuitfind.model.loading import load_model

from conftest import train_error

SMOKE = ("+desiderata=vd_oi", "experiment=smoke", "progress=false")
OUTPUTS = [
    "circuit.json",
    "mask.safetensors",
    "metrics.jsonl",
    "mask_heatmap.png",
    "curves.png",
    "attention.png",
    ".hydra/config.yaml",
]


def test_help_lists_commands_and_groups(cli):
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout
    train_help = cli("train", "--help")
    assert train_help.returncode == 0
    groups = {  # each group's line lists (at least) these options
        "model": {"organism", "hf", "smollm2_135m", "gemma3_270m", "tracr"},
        "task": {"arithmetic", "entity_binding", "ioi"},
        "desiderata": {"chain", "entity", "ioi", "oi", "repeat", "vd", "vd_oi"},
        "optimizer": set(),
        "units": {"heads_mlps", "neurons", "residual"},
    }
    lines: dict = {}
    for line in train_help.stdout.splitlines():  # the groups section comes before the config's own keys
        if ":" in line:
            lines.setdefault(line.split(":")[0].strip(), line)
    for group, options in groups.items():
        assert group in lines, group
        listed = {o.strip() for o in lines[group].split(":", 1)[1].split(",")}
        assert options <= listed, (group, options - listed)
    cfg = cli("train", "+desiderata=vd_oi", "--cfg", "job")
    assert cfg.returncode == 0 and "lam: 0.05" in cfg.stdout and "name: vd_oi" in cfg.stdout


def test_tab_completion_knows_commands_and_config(cli):
    assert "complete" in cli("-sc", "install=bash").stdout
    assert cli("-sc", "query=bash", env={"COMP_LINE": "circuitfind tr"}).stdout.split() == ["train"]
    out = cli("-sc", "query=bash", env={"COMP_LINE": "circuitfind train optimizer.l"}).stdout.split()
    assert "optimizer.lam=" in out and "optimizer.lr=" in out


def test_train_writes_every_output(cli, tmp_path):
    run_dir = tmp_path / "run"
    # lam=0 and a large step: the random model's mask moves, so the circuit has heads to plot.
    res = cli("train", *SMOKE, "optimizer.lam=0", "optimizer.lr=0.3", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    circuit = json.loads((run_dir / "circuit.json").read_text())
    assert circuit["status"] == "complete"
    assert circuit["n_components"] == 2 * 5 and circuit["n_patched"] == len(circuit["circuit"])
    for key in (
        "vd_test/acc",
        "vd_test/acc_model",
        "oi_test/acc",
        "vd_transfer/acc",
        "oi_transfer/acc",
        "vd_test/logit_diff",
        "vd_test/logit_diff_norm",
    ):
        assert 0 <= circuit["metrics"][key] <= 1 or "logit" in key, key
    assert "vd_test/task_acc" in circuit["baseline"] and circuit["data"]["fingerprint"]
    masks = load_file(run_dir / "mask.safetensors")
    assert masks["continuous"].shape == masks["rounded"].shape == (2, 5)
    assert set(masks["rounded"].unique().tolist()) <= {0.0, 1.0}
    assert int((masks["circuit"] == 0).sum()) == circuit["n_patched"], "the headline circuit: pruned"
    assert int((masks["rounded"] == 0).sum()) == circuit["raw"]["n_patched"], "the rounded mask it came from"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10))
    assert {"vd_loss", "oi_loss", "sparsity", "n_patched"} <= set(rows[0])
    assert "vd_test/acc" in rows[4] and "oi_test/acc" in rows[9]  # eval_every=5 in experiment=smoke
    assert not list(run_dir.glob(".*.tmp")), "no temporary file is left behind"


def test_same_seed_same_mask(cli, tmp_path):
    masks = []
    for name in ("a", "b"):
        run = tmp_path / name
        assert cli("train", *SMOKE, "optimizer.lam=0.0", "optimizer.lr=0.2", f"hydra.run.dir={run}").returncode == 0
        masks.append(load_file(run / "mask.safetensors")["continuous"])
    assert torch.equal(masks[0], masks[1])
    assert (masks[0] < 1).any(), "the mask moved, so equality means something"


def test_multirun_writes_sweep_summary(cli, tmp_path):
    sweep = tmp_path / "sweep"
    res = cli("train", *SMOKE, "-m", "optimizer.lam=0.02,0.1", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr
    assert len(list(sweep.glob("*/circuit.json"))) == 2
    for name in ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.json", "sweep_figure.png"):
        assert (sweep / name).is_file(), name
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["lam"] for r in rows] == [0.02, 0.1]
    assert {"n_patched", "vd_test/acc", "oi_test/acc", "vd_transfer/acc"} <= set(rows[0])


def test_wandb_offline_run_files(cli, tmp_path):
    run_dir = tmp_path / "run"
    res = cli("train", *SMOKE, "logger=wandb", f"hydra.run.dir={run_dir}", env={"WANDB_MODE": None})
    assert res.returncode == 0, res.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def save_tiny_bloom(path: Path) -> None:
    """A causal LM of a family with no component adapter."""
    tok = build_char_tokenizer()
    BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=2)).save_pretrained(path)
    tok.save_pretrained(path)


def save_tiny_llama(path: Path, tokenizer=None, poison: bool = False) -> None:
    loaded = load_model(ModelConfig(kind="tiny_llama"))
    model, tok = loaded.model, loaded.tokenizer
    if poison:
        with torch.no_grad():
            model.lm_head.weight[:] = float("nan")
    model.save_pretrained(path)
    (tokenizer or tok).save_pretrained(path)


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that glues a space to the next word, as GPT-2's does: ' 12' is one piece."""
    pieces = ["=", "\n", "x", "y", "+", "-", "*"] + [str(d) for d in range(10)]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", " ", *pieces, *(f" {p}" for p in pieces)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(" ?[^ ]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>")


BAD_INPUTS = {
    "no desiderata": (("task.desiderata=null",), "names no desiderata and none were chosen; add +desiderata=<name>"),
    "unknown key": (("+desiderata=vd_oi", "optimizer.lamm=1"), "Key 'lamm' not in 'OptimizerConfig'"),
    "unknown option": (("+desiderata=vd_oi", "model=tiny_lama"), "'model/tiny_lama'; available options: "),
    "wrong type": (("+desiderata=vd_oi", "optimizer.steps=ten"), "could not be converted to Integer"),
    "negative lambda": (("+desiderata=vd_oi", "optimizer.lam=-1"), "optimizer.lam=-1.0 is negative"),
    "zero steps": (("+desiderata=vd_oi", "optimizer.steps=0"), "give at least 1 iteration"),
    "too few prompts": (
        ("+desiderata=vd_oi", "task.n_train=5000"),
        "task.n_train can be at most",
    ),
    "slot without a domain": (
        ("task.template='{xname} = {x}\\n{q} = '",),
        "uses {q}, which has no domain; add task.slots.q",
    ),
    "value of several tokens": (("task=ioi", "model=tiny_llama"), "' Mary' is 5 tokens"),
    "desideratum varies a missing slot": (("task=ioi", "+desiderata=vd_oi"), "names slot 'x', which task ioi lacks"),
    "unsafe expression": (("task.answer='x ** y'",), "uses 'x ** y', which task expressions do not allow"),
    "old dataset group": (("dataset=paper",), "dataset= is now task="),
    "desiderata key without desiderata": (("desiderata.terms=[]",), "edit the task's own as task.desiderata.terms=[]"),
    "wrong type in a task": (("task.n_train=ten",), "task.n_train"),
    "missing model": (("+desiderata=vd_oi", "model=hf", "model.name_or_path=/no/such/model"), "does not exist"),
    "engine": (("+desiderata=vd_oi", "engine=fast"), "engine='fast' is unknown; choose from ['cached', 'full']"),
    "cache policy": (
        ("+desiderata=vd_oi", "cache=disk"),
        "cache='disk' is unknown; choose from ['device', 'cpu', 'recompute']",
    ),
    "negative lambda in lams": (("+desiderata=vd_oi", "optimizer.lams=[0.1,-0.1]"), "has a negative lambda"),
    "W&B mode": (("+desiderata=vd_oi", "logger=wandb", "logger.mode=live"), "logger.mode='live' is unknown"),
    "low baseline, strict": (("+desiderata=vd_oi", "min_baseline_acc=0.5", "strict=true"), "not trustworthy"),
}


def bad_input_overrides(case: str) -> list[str]:
    """The command line of one bad-input case (the smoke experiment, but for the low-baseline case)."""
    overrides, _ = BAD_INPUTS[case]
    args = [a for a in SMOKE if not a.startswith("+desiderata")] + list(overrides)
    if case.startswith("low baseline"):
        args.remove("experiment=smoke")
        args += ["model=tiny_llama", "task.n_train=9", "task.n_test=9", "task.n_transfer=9", "optimizer.steps=1"]
    return args


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case):
    """In this process, through the command's own checks, composition, validation and preparation."""
    line = train_error(*bad_input_overrides(case))
    assert line is not None and line.startswith("circuitfind:")
    assert BAD_INPUTS[case][1] in line


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["unknown key", "value of several tokens", "old dataset group"])
def test_the_command_prints_that_line_and_keeps_earlier_outputs(cli, tmp_path, case):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = run_dir / "circuit.json"
    earlier.write_text('{"earlier": true}')
    args = bad_input_overrides(case)
    res = cli("train", *args, "overwrite=true", f"hydra.run.dir={run_dir}")  # even overwrite keeps them
    assert res.returncode == (2 if case == "old dataset group" else 1)
    lines = [line for line in res.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert lines == [train_error(*args, "overwrite=true", f"hydra.run.dir={run_dir}")], res.stderr
    assert earlier.read_text() == '{"earlier": true}'


def test_k_lambdas_in_one_run_write_k_results_and_a_summary(cli, tmp_path):
    run_dir = tmp_path / "run"
    res = cli("train", *SMOKE, "optimizer.lams=[0.0,0.02,0.1]", "optimizer.lr=0.3", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr
    for lam in ("0", "0.02", "0.1"):
        result = json.loads((run_dir / f"lam={lam}" / "circuit.json").read_text())
        assert result["lam"] == float(lam) and result["timing"]["masks_trained_together"] == 3
        assert (run_dir / f"lam={lam}" / "metrics.jsonl").is_file()
    rows = json.loads((run_dir / "sweep_summary.json").read_text())
    assert [r["lam"] for r in rows] == [0.0, 0.02, 0.1] and (run_dir / "sweep_figure.png").is_file()
    assert rows[0]["n_patched"] >= rows[-1]["n_patched"]


def test_low_baseline_without_strict_warns_and_runs(cli, tmp_path):
    run_dir = tmp_path / "run"
    res = cli("train", *SMOKE, "min_baseline_acc=0.5", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0 and "not trustworthy" in res.stdout + res.stderr
    assert json.loads((run_dir / "circuit.json").read_text())["warnings"]


def test_unsupported_model_family(cli, tmp_path):
    save_tiny_bloom(tmp_path / "bloom")
    res = cli(
        "train", *SMOKE, "model=hf", f"model.name_or_path={tmp_path / 'bloom'}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert res.returncode == 1 and "model family 'bloom' is not supported; supported: " in res.stderr
    assert "llama" in res.stderr.split("supported: ")[1]


def test_hf_model_from_local_directory(cli, tmp_path):
    save_tiny_llama(tmp_path / "llama")
    run_dir = tmp_path / "r"
    res = cli("train", *SMOKE, "model=hf", f"model.name_or_path={tmp_path / 'llama'}", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr
    assert json.loads((run_dir / "circuit.json").read_text())["model"]["model_type"] == "llama"


def test_tokenizer_that_does_not_split_the_answer(cli, tmp_path):
    save_tiny_llama(tmp_path / "llama", tokenizer=merging_tokenizer())
    res = cli(
        "train", *SMOKE, "model=hf", f"model.name_or_path={tmp_path / 'llama'}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert res.returncode == 1 and "does not split the answer cleanly" in res.stderr


def test_nan_loss_stops_and_keeps_the_last_good_mask(cli, tmp_path):
    save_tiny_llama(tmp_path / "llama", poison=True)
    run_dir = tmp_path / "r"
    poisoned = (*SMOKE, "model=hf", f"model.name_or_path={tmp_path / 'llama'}")
    res = cli("train", *poisoned, f"hydra.run.dir={tmp_path / 'checked'}")  # the self-checks see it first
    assert res.returncode == 1 and "logits are not finite (NaN or inf) on 4 of the first 4 prompts" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "checked").exists()
    res = cli("train", *poisoned, "checks=false", f"hydra.run.dir={run_dir}")  # then training does
    assert res.returncode == 1 and "non-finite" in res.stderr
    assert not (run_dir / "circuit.json").exists()
    kept = load_file(run_dir / "mask_last_good.safetensors")["continuous"]
    assert torch.isfinite(kept).all()


def test_ci_script_installs_as_the_readme_says():
    repo = Path(__file__).resolve().parents[1]
    ci = (repo / ".ci" / "run").read_text()
    readme = (repo / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
    makefile = (repo / "Makefile").read_text()
    assert "python3 -m venv" in makefile and "pip install -e" in makefile
    assert os.access(repo / ".ci" / "run", os.R_OK)
