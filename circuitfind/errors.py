"""The one exception type whose message is shown to the user as a single line, and what becomes one."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class CircuitfindError(Exception):
    """Bad input or an untrustworthy run: the message names the problem and the fix."""

    exit_code = 1


class UsageError(CircuitfindError):
    """A command line that cannot mean anything (exit status 2, as argparse's)."""

    exit_code = 2


def out_of_memory(e: BaseException) -> bool:
    """A CUDA/CPU allocation failure, whichever exception type the backend raised."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@contextmanager
def out_of_memory_hint(message: str) -> Iterator[None]:
    """Turn running out of memory inside the block into one line: `out of memory <message>`."""
    try:
        yield
    except RuntimeError as e:
        if out_of_memory(e):
            raise CircuitfindError(f"out of memory {message}") from e
        raise
