"""The organism on disk: where it is shipped, and loading it with every file checked first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuitfind.errors import CircuitfindError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ASSET_DIR = ASSETS / "organism"  # the default model (model=organism)
# Models shipped in the package, by folder, and the command that makes each (its card has the details).
SHIPPED = {
    "organism": "circuitfind organism ship=true num_threads=1",
    # two fine-tunings of the shipped organism (the first moves the circuit, the second trains value
    # dependence harder); the card lists both commands as they were run
    "organism_positional": (
        "circuitfind organism init=organism 'iit.position=\"xname#2\"' 'iit.circuit=[L1.H1,L1.H2,L1.H3,L1.H6]' "
        "iit.start=0 iit.ramp=200 dataset.variants_start=0 optim.steps=1500 optim.lr=0.001 dbm_lams=[] "
        "out_dir=outputs/organism_positional_1 && circuitfind organism init=outputs/organism_positional_1 "
        "'iit.position=\"xname#2\"' 'iit.circuit=[L1.H1,L1.H2,L1.H3,L1.H6]' iit.start=0 iit.ramp=0 iit.vd=3.0 "
        "iit.batch_size=32 dataset.variants_start=0 optim.steps=2000 optim.lr=0.001 asset=organism_positional ship=true"
    ),
}
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def checkpoint_dir(name_or_path: str) -> Path:
    """The folder of a shipped organism (by its asset name) or of a checkpoint directory."""
    return ASSETS / name_or_path if name_or_path in SHIPPED else Path(name_or_path).expanduser()


def _regenerate(path: Path) -> str:
    if path.resolve().parent == ASSETS.resolve() and path.name in SHIPPED:
        return f"`{SHIPPED[path.name]}`"
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


def load_checkpoint(name_or_path: Optional[str], dtype: torch.dtype = torch.float32, asset: str = "organism"):
    """The organism and its tokenizer, from `name_or_path` or the copy shipped in the package as `asset`."""
    if not name_or_path and asset not in SHIPPED:
        raise CircuitfindError(f"model.asset={asset!r} is not shipped; choose from {list(SHIPPED)}")
    path = Path(name_or_path).expanduser() if name_or_path else ASSETS / asset
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
