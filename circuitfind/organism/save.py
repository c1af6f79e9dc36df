"""Saving a trained organism: weights and tokenizer, its training record, the model card, shipping."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

from circuitfind.model.checkpoint import ASSETS
from circuitfind.organism.card import model_card
from circuitfind.records.files import write_json, write_text


def save_checkpoint(model, tokenizer, result: Dict, command: str, out_dir: Path) -> None:
    """Weights and tokenizer into `out_dir` (then `write_record` adds organism.json and README.md).

    The planted circuit and the held-out split also go into config.json, as `circuitfind`.
    """
    cfg = result["config"]
    model.config.circuitfind = {
        "planted_circuit": list(cfg["iit"]["circuit"]),
        "planted_position": cfg["iit"].get("position", "last"),
        "planted_ops": list(cfg["iit"]["ops"]),
        "dataset": cfg["dataset"],
        "seed": cfg["seed"],
        "accuracy": result["accuracy"],
        "command": command,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def write_record(result: Dict, command: str, out_dir: Path) -> None:
    """The training record (organism.json) and the model card (README.md) next to the weights."""
    write_json(Path(out_dir) / "organism.json", result | {"command": command})
    write_text(Path(out_dir) / "README.md", model_card(result, command))


def ship(checkpoint: Path, asset: str = "organism") -> Path:
    """Copy a saved checkpoint into the package (assets/<asset>), where `model=<asset>` finds it."""
    target = ASSETS / asset
    target.mkdir(parents=True, exist_ok=True)
    for path in Path(checkpoint).iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)
            (target / path.name).chmod(0o644)  # readable by everyone once installed
    return target
