"""The organism on disk: save_pretrained weights, tokenizer, results and model card; checked loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuitfind.errors import CircuitfindError
from circuitfind.organism.card import model_card
from circuitfind.outputs import write_json, write_text

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "organism"
SHIP_COMMAND = "circuitfind organism ship=true num_threads=1"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def save_checkpoint(model, tokenizer, result: Dict, command: str, out_dir: Path) -> None:
    """Weights and tokenizer into `out_dir` (then `write_record` adds organism.json and README.md).

    The planted circuit and the held-out split also go into config.json, as `circuitfind`.
    """
    cfg = result["config"]
    model.config.circuitfind = {
        "planted_circuit": list(cfg["iit"]["circuit"]),
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


def ship(checkpoint: Path) -> None:
    """Copy a saved checkpoint into the package, where `model=organism` finds it."""
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    for path in Path(checkpoint).iterdir():
        if path.is_file():
            shutil.copyfile(path, ASSET_DIR / path.name)
            (ASSET_DIR / path.name).chmod(0o644)  # readable by everyone once installed


def _regenerate(path: Path) -> str:
    if path.resolve() == ASSET_DIR.resolve():
        return f"`{SHIP_COMMAND}`"
    return f"`circuitfind organism out_dir={path}`"


def check_files(path: Path) -> None:
    """Fail with one line naming the first missing or unreadable checkpoint file."""
    for name in FILES:
        file = path / name
        fix = f"regenerate it with {_regenerate(path)}"
        if not file.is_file():
            raise CircuitfindError(f"organism checkpoint file {file} is missing; {fix}")
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            elif name == "tokenizer.json":
                Tokenizer.from_file(str(file))
            else:
                json.loads(file.read_text())
        except Exception as e:  # each reader has its own error types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CircuitfindError(f"organism checkpoint file {file} is corrupt ({first}); {fix}") from e


def load_checkpoint(name_or_path: Optional[str], dtype: torch.dtype = torch.float32):
    """The organism and its tokenizer, from `name_or_path` or the copy shipped in the package."""
    path = Path(name_or_path).expanduser() if name_or_path else ASSET_DIR
    check_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # files parse but do not fit together, e.g. weights of another shape
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CircuitfindError(
            f"cannot load the organism from {path} ({first}); regenerate it with {_regenerate(path)}"
        ) from e
    return model, tokenizer
