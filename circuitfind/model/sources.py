"""Where a pretrained model comes from, checked before any weight is read: the directory or hub id,
the GGUF file, the tokenizer files, the hub's reachability, and whether the family is supported."""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
from typing import Any, BinaryIO, Dict, Optional, Tuple

from transformers import AutoConfig

from circuitfind.config.schema import ModelConfig
from circuitfind.errors import CircuitfindError
from circuitfind.model.components import ADAPTERS, unsupported_family
from circuitfind.network import reachable

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
TRUE = ("1", "true", "yes", "on")


def require(module: str, what: str, install: str, package: str | None = None) -> None:
    """Stop with the install command when an optional package is missing (`package`: its name on the
    package index, where that is not the module's)."""
    if importlib.util.find_spec(module) is None:
        raise CircuitfindError(f"{what} needs the {package or module} package, which is not installed: {install}")


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
    if common.get("gguf_file"):  # from the file's header: transformers would parse all of it
        check_gguf_family(os.path.join(path, common["gguf_file"]))
        return
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError, KeyError):
        return  # loading the model reports it, with its own hint
    types = {getattr(config.get_text_config(), "model_type", None), config.model_type}
    if not types & set(ADAPTERS):
        raise unsupported_family(config.model_type)


# GGUF value types (the GGUF specification): fixed sizes in bytes, and the two variable-length ones.
GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9
# llama.cpp's architecture names whose transformers model_type differs (transformers' GGUF loader renames them).
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


class _Header:
    """Reads a GGUF header's key/value pairs one at a time, in the file's byte order."""

    def __init__(self, f: BinaryIO, order: str):
        self.f, self.order = f, order

    def bytes(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def uint(self, size: int) -> int:
        return struct.unpack(self.order + {4: "I", 8: "Q"}[size], self.bytes(size))[0]

    def string(self) -> str:
        n = self.uint(8)
        if n > 1 << 16:  # keys and architecture names are short: a corrupt length, not a 2**60-byte read
            raise ValueError(f"a key or name of {n} bytes")
        return self.bytes(n).decode("utf-8", errors="replace")

    def skip(self, kind: int) -> None:
        if kind == GGUF_STRING:
            self.f.seek(self.uint(8), os.SEEK_CUR)
        elif kind == GGUF_ARRAY:
            item, count = self.uint(4), self.uint(8)
            if item in GGUF_SIZES:
                self.f.seek(GGUF_SIZES[item] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip(item)
        elif kind in GGUF_SIZES:
            self.f.seek(GGUF_SIZES[kind], os.SEEK_CUR)
        else:
            raise ValueError(f"unknown value type {kind}")


def gguf_architecture(file: str) -> str:
    """`general.architecture` of a GGUF file, read from its header alone.

    transformers parses every field of the header to build a config, the tokenizer's vocabulary
    included (Gemma 3's 262,144 tokens: half a minute); this reads up to the one key needed."""
    with open(file, "rb") as f:
        try:
            if f.read(4) != b"GGUF":
                raise ValueError("it does not start with the bytes GGUF")
            (version,) = struct.unpack("<I", f.read(4))
            header = _Header(f, "<" if 0 < version < 65536 else ">")  # big-endian files exist too
            header.uint(8)  # the tensor count
            for _ in range(header.uint(8)):  # the key/value pairs; the architecture comes first in practice
                key, kind = header.string(), header.uint(4)
                if key == "general.architecture" and kind == GGUF_STRING:
                    return header.string()
                header.skip(kind)
        except (EOFError, ValueError, struct.error) as e:
            why = str(e) or "it ends inside its header"
            raise CircuitfindError(f"{file} is not a readable GGUF file ({why}); copy or download it again") from None
    raise CircuitfindError(f"{file} has no general.architecture in its header; give a GGUF file made by llama.cpp")


def check_gguf_family(file: str) -> None:
    """Refuse a GGUF file that transformers cannot read, or whose family circuitfind has no Adapter for."""
    from transformers import __version__
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(file)
    model_type = GGUF_MODEL_TYPES.get(architecture, architecture)
    if not {architecture, model_type} & set(GGUF_SUPPORTED_ARCHITECTURES):
        readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        raise CircuitfindError(
            f"{os.path.basename(file)} is a GGUF file of architecture {architecture!r}, which transformers "
            f"{__version__} cannot read (it reads {', '.join(readable)}); load the model's safetensors checkpoint "
            "instead: model=hf model.name_or_path=<its folder or hub id>"
        )
    if model_type not in ADAPTERS:
        raise unsupported_family(model_type)
