"""Run directories on disk: finished runs, the config each was made with, and who owns a directory."""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List

from omegaconf import DictConfig, OmegaConf

from circuitfind.errors import CircuitfindError
from circuitfind.records.circuit import RECORD_FILE, read_record
from circuitfind.records.files import write_text


def finished_runs(path: Path) -> List[Path]:
    """The finished run directories at `path`: itself, or the jobs of a sweep in it."""
    path = Path(path)
    if not path.is_dir():
        raise CircuitfindError(f"{path} is not a directory; give a run or sweep directory under outputs/")
    if (path / RECORD_FILE).is_file():
        return [path]
    runs = sorted({p.parent for pattern in (f"*/{RECORD_FILE}", f"*/lam=*/{RECORD_FILE}") for p in path.glob(pattern)})
    if not runs:
        raise CircuitfindError(
            f"{path} holds no finished run (no {RECORD_FILE} in it or its subdirectories); "
            "finish a run with `circuitfind train +desiderata=vd_oi` first"
        )
    return runs


def invocation_file(run: Path, name: str) -> Path | None:
    """A file of the run's .hydra/ (config.yaml, overrides.yaml), or None when it was not recorded."""
    for folder in (Path(run), Path(run).parent):  # lam=<value>/ results keep it one level up
        path = folder / ".hydra" / name
        if path.is_file():
            return path
    return None


def job_overrides(run: Path) -> List[str]:
    """The command-line overrides a run was made with (empty when not recorded)."""
    path = invocation_file(run, "overrides.yaml")
    return [str(o) for o in OmegaConf.load(path)] if path else []


def write_invocation(run_dir: Path, cfg: DictConfig, overrides: List[str], hydra: DictConfig | None = None) -> None:
    """.hydra/config.yaml and overrides.yaml (and hydra.yaml, from the Hydra app), as Hydra would write them."""
    folder = Path(run_dir) / ".hydra"
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    if hydra is not None:
        write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})))


def load_config(run: Path) -> DictConfig:
    """The composed config a finished run was made with: its record's, or (older runs) Hydra's copy in .hydra/."""
    config = read_record(run).config
    if not config:
        path = invocation_file(run, "config.yaml")
        if not path:
            raise CircuitfindError(
                f"{run} has no .hydra/config.yaml; re-run it with `circuitfind train` to record its config"
            )
        config = OmegaConf.to_container(OmegaConf.load(path))
    if "dataset" in config and "task" not in config:
        raise CircuitfindError(
            f"{run} was made by circuitfind 0.1, whose `dataset` config is now `task`; re-run it "
            "with `circuitfind train task=arithmetic ...` (README, Tasks and desiderata as data)"
        )
    return OmegaConf.create(config)


LOCK_FILE = ".circuitfind.lock"  # held (flock) by the process writing into the directory, for its whole life


def holder(run_dir: Path) -> int | None:
    """The pid of the live process that holds `run_dir`, or None when it is free."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = path.read_text().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # closing drops a lock this check took
    return None


def unique_dir(root: Path) -> Path:
    """A new directory name under `root`, `<date>/<time>` to the microsecond, that no other run has."""
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    return Path(root) / stamp


@contextmanager
def owned(run_dir: Path, what: str = "hydra.run.dir") -> Iterator[None]:
    """Hold `run_dir` while the block runs: another process (or another run in this one) that asks for
    it stops with one line instead of mixing its outputs in. The lock goes with the process, even on a crash."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = path.read_text().strip()
        raise CircuitfindError(
            f"{run_dir} is in use by another circuitfind run (pid {pid or 'unknown'}); give another {what}, "
            "or wait for that run to finish"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# A run directory also holds what Hydra keeps of the invocation, and its lock; anything else is a run's output.
INVOCATION = (".hydra", LOCK_FILE)
IGNORED = (
    "progress",
    "overwrite",
    "checks",
)  # keys that change how a run looks, starts or is checked, never what it finds


def earlier_outputs(run_dir: Path) -> List[str]:
    """The entries of a run directory that an earlier run wrote (not Hydra's .hydra/ and logs)."""
    if not Path(run_dir).is_dir():
        return []
    return sorted(e.name for e in Path(run_dir).iterdir() if e.name not in INVOCATION and e.suffix != ".log")


def clear_outputs(run_dir: Path) -> None:
    """Remove an earlier run's outputs, so that a run starts from an empty directory."""
    for name in earlier_outputs(run_dir):
        entry = Path(run_dir) / name
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def discard_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but empty logs and its lock (an input error stopped the run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    unused = [e.name == LOCK_FILE or (e.suffix == ".log" and e.stat().st_size == 0) for e in entries if e.is_file()]
    if len(unused) == len(entries) and all(unused):
        for e in entries:
            e.unlink()
        run_dir.rmdir()


def flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as dotted keys; lists and scalars are values."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: Dict[str, Any] = {}
    for key, value in config.items():
        out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return out


def config_differences(saved: Dict[str, Any], requested: Dict[str, Any]) -> List[str]:
    """The dotted keys whose values differ between two plain configs, IGNORED keys aside."""
    a, b = flatten(saved), flatten(requested)
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[0] not in IGNORED and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys]


def refuse_earlier_run(run_dir: Path, overwrite: bool) -> None:
    """A run does not mix its outputs with an earlier run's in the same directory."""
    earlier = earlier_outputs(run_dir)
    if earlier and not overwrite:
        raise CircuitfindError(
            f"{run_dir} already holds a run ({', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''}); "
            "give another hydra.run.dir, or overwrite=true to replace it"
        )
