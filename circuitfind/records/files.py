"""Atomic writes: a file appears complete or not at all, even if the run is killed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict

if TYPE_CHECKING:  # torch only where tensors are written, not for every JSON file
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` into a temporary sibling, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    _atomic(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata))


def save_figure(path: Path, fig) -> None:
    _atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip("."), dpi=120, bbox_inches="tight"))
