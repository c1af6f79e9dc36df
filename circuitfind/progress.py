"""Progress that reads well wherever it goes: a tqdm bar on a terminal, and where stderr is a file or a
pipe (a cluster job's log, `2> run.err`), a log line every tenth of the way instead of one long line
of carriage returns."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm import tqdm

log = logging.getLogger("circuitfind.progress")
LINES = 10  # log lines over the whole task when stderr is not a terminal


def log_lines() -> None:
    """Log lines as a Hydra run writes them, for the commands Hydra does not start (eval, optimum)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextmanager
def progress(total: int, desc: str, enabled: bool = True, unit: str = "step") -> Iterator[Callable[[int], None]]:
    """`with progress(n, "mask") as advance: ... advance(1)`: a bar on a terminal, log lines elsewhere."""
    if not enabled:
        yield lambda n=1: None
        return
    if on_terminal():
        bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        try:
            yield bar.update
        finally:
            bar.close()
        return
    done, shown, start = 0, 0, time.perf_counter()
    every = max(1, total // LINES)

    def advance(n: int = 1) -> None:
        nonlocal done, shown
        done += n
        if done - shown >= every or done == total:
            shown = done
            elapsed = time.perf_counter() - start
            log.info(f"{desc}: {done}/{total} {unit}s ({elapsed:.0f} s)")

    yield advance
