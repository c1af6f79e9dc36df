"""Where a pretrained model comes from, checked before any weight is read: the directory or hub id,
the GGUF file, the tokenizer files, the hub's reachability, and whether the family is supported."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Dict, Optional, Tuple

from transformers import AutoConfig

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.model.components import ADAPTERS, unsupported_family
from circuitfind.network import reachable

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
TRUE = ("1", "true", "yes", "on")


def require(module: str, what: str, install: str) -> None:
    """Stop with the install command when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise CircuitfindError(f"{what} needs the {module} package, which is not installed: {install}")


def hf_source(cfg: ModelConfig) -> Tuple[str, Optional[str]]:
    """(directory or hub id, GGUF file name in it or None) from model.name_or_path and model.gguf_file."""
    path, gguf = cfg.name_or_path, cfg.gguf_file
    if gguf:
        require("gguf", f"model.gguf_file={gguf}", "pip install gguf")
        full = os.path.expanduser(gguf)
        if os.path.isfile(full):  # a path of its own: the folder it is in is the model's
            return os.path.dirname(os.path.abspath(full)), os.path.basename(full)
        if not path:
            raise CircuitfindError(
                f"model.gguf_file={gguf!r} does not exist; give the path of a .gguf file, "
                "or its name inside model.name_or_path"
            )
        local = os.path.expanduser(path)
        if os.path.isdir(local) and not os.path.isfile(os.path.join(local, gguf)):
            raise CircuitfindError(f"model.gguf_file={gguf!r} is not in {path!r}; give an existing .gguf file")
    if not path:
        raise CircuitfindError(
            "model=hf needs model.name_or_path=<local directory or hub id> (or model.gguf_file=<file>)"
        )
    # A hub id is "org/name"; anything else that names no directory is a typo'd local path.
    is_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not is_hub_id and not os.path.isdir(os.path.expanduser(path)):
        raise CircuitfindError(f"model.name_or_path={path!r} does not exist; give an existing directory or a hub id")
    return os.path.expanduser(path), gguf


def hub_access(path: str) -> Dict[str, Any]:
    """from_pretrained arguments for a hub id: the local cache only, when the hub is offline or unreachable
    (transformers would otherwise retry for about a minute)."""
    if os.path.isdir(path):
        return {}
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return {"local_files_only": True}
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if reachable(endpoint):
        return {}
    log.warning(f"{endpoint} cannot be reached: {path!r} is looked up in the local Hugging Face cache only")
    return {"local_files_only": True}


def check_tokenizer_files(path: str, gguf: Optional[str]) -> None:
    """A local model directory must hold its tokenizer (a GGUF file carries its own)."""
    if gguf or not os.path.isdir(path):
        return
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise CircuitfindError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the model's tokenizer files next to its weights"
        )


def check_family(path: str, common: Dict[str, Any]) -> None:
    """Refuse an unsupported model family from its config alone, before any weight is loaded."""
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError, KeyError):
        return  # loading the model reports it, with its own hint
    types = {getattr(config.get_text_config(), "model_type", None), config.model_type}
    if not types & set(ADAPTERS):
        raise unsupported_family(config.model_type)
