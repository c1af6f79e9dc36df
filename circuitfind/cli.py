"""`circuitfind <command> [args]`: dispatches to one Hydra app or plain command per name.

Errors a user can fix (config typos, impossible values, missing files) are shown as one
line naming the problem and the fix; anything else keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict

COMMANDS: Dict[str, str] = {
    "train": "find a circuit: train a sparse mask from desiderata (Hydra app, configs/train.yaml)",
    "organism": "train the model organism, a small LLaMA with a planted circuit (Hydra app, configs/organism.yaml)",
    "eval": "test a circuit (a run's, or named, or a mask or MIB file): necessity, sufficiency, minimality, intervals",
    "optimum": "exhaustive search for the best circuit of each small size; the gap to a run's circuit",
    "report": "an HTML and Markdown report of a run or sweep directory, with every plot embedded",
    "compare": "circuits of finished runs of one task side by side: units by relative depth, attention, effect alone, roles",
}
HYDRA_APPS = ("train", "organism")
DATASET_RENAMED = (
    "dataset= is now task= (dataset=paper -> task=arithmetic, dataset=retrieval -> task=retrieval); "
    "dataset.n_train -> task.n_train, dataset.template -> task.template, "
    "dataset.ranges.<op>.x -> task.slots.x.range (README, Tasks)"
)

USAGE = (
    "usage: circuitfind <command> [hydra overrides | arguments]\n\n"
    "commands:\n" + "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items()) + "\n\nexamples:\n"
    "  circuitfind train +desiderata=vd_oi\n"
    "  circuitfind train +desiderata=vd_oi -m optimizer.lam=0.02,0.05,0.1\n"
    "  circuitfind train --help        (config groups and options)\n"
    "  circuitfind organism ship=true  (retrain the shipped model organism)\n"
    "  circuitfind eval outputs/train/<date>/<time> --n-test 200\n"
    "  circuitfind eval +desiderata=vd_oi 'circuit=[L2.H1,L2.H3,L2.H4,L2.H6]' 'evaluate.ablations=[zero,mean,resample]'\n"
    "  circuitfind optimum outputs/train/<date>/<time> --k 4\n"
    "  circuitfind report outputs/sweeps/<date>/<time>\n"
    "  circuitfind compare <run> <run>    (runs of one task, e.g. task=ioi in two models)\n"
    "  circuitfind --version\n"
    '  eval "$(circuitfind -sc install=bash)"   (tab completion)\n'
)


def _app(command: str) -> Callable[[], None]:
    """The entry point of a command, imported only when it runs (circuitfind/apps/<command>.py)."""
    module = importlib.import_module(f"circuitfind.apps.{command}")
    if command in HYDRA_APPS:
        return module.main  # Hydra reads sys.argv itself
    return lambda: module.main(sys.argv[1:])


def one_line(exc: BaseException) -> str:
    """Condense a config or input error to one line: the problem, then how to fix it."""
    from hydra.errors import MissingConfigException

    text = str(exc).strip()
    if isinstance(exc, MissingConfigException) and getattr(exc, "options", None):
        missing = text.splitlines()[0].replace("In 'train': ", "")
        return f"{missing}; available options: {', '.join(exc.options)}"
    cause = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if cause is not None and str(cause).strip():
        # Hydra wraps OmegaConf's precise message ("Key 'lamm' not in 'OptimizerConfig'").
        first = str(cause).strip().splitlines()[0]
        message = f"{lines[0].rstrip('.')}: {first}"
        if "not in" in first:
            nearest = nearest_key(cause)
            message += f"; did you mean {nearest}?" if nearest else ""
            message += "; list the valid keys with `circuitfind train --cfg job`"
        return message
    return " ".join(lines[:2]) if lines else type(exc).__name__


def nearest_key(error: BaseException) -> str | None:
    """The valid key closest to a mistyped one (`optimizer.lamm` -> `optimizer.lam`), from the schema."""
    import dataclasses
    import difflib

    key, full_key, schema = (getattr(error, a, None) for a in ("key", "full_key", "object_type"))
    if not (isinstance(key, str) and isinstance(full_key, str) and dataclasses.is_dataclass(schema)):
        return None
    match = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(schema)], n=1)
    parent = full_key.rpartition(".")[0]
    return f"{parent + '.' if parent else ''}{match[0]}" if match else None


def check_run_dir_free(args: list[str]) -> None:
    """A `hydra.run.dir` that another circuitfind run holds is refused before Hydra logs anything into it."""
    from pathlib import Path

    from circuitfind.errors import CircuitfindError
    from circuitfind.records.rundir import holder

    for arg in args:
        if arg.startswith("hydra.run.dir="):
            run_dir = Path(arg.split("=", 1)[1].strip("'\""))
            pid = holder(run_dir)
            if pid is not None:
                raise CircuitfindError(
                    f"{run_dir} is in use by another circuitfind run (pid {pid}); give another hydra.run.dir, "
                    "or wait for that run to finish"
                )


def check_train_overrides(args: list[str]) -> None:
    """Refuse, before Hydra, overrides whose target does not exist in this config."""
    from circuitfind.errors import UsageError

    renamed = [a for a in args if a.lstrip("+~").startswith("dataset")]
    if renamed:
        raise UsageError(f"{renamed[0]!r}: {DATASET_RENAMED}")
    circuit = [a for a in args if a.lstrip("+").startswith("circuit=")]
    if circuit:
        raise UsageError(
            f"{circuit[0]!r}: train finds a circuit; to test one you have, run "
            f"circuitfind eval <the same options> {circuit[0]}"
        )
    chosen = any(a.lstrip("+").startswith("desiderata=") for a in args)
    inner = [a for a in args if a.lstrip("+~").startswith("desiderata.")]
    if inner and not chosen:
        raise UsageError(
            f"{inner[0]!r}: no desiderata were chosen, so there is nothing to change; "
            f"edit the task's own as task.{inner[0].lstrip('+~')}, or choose them first: +desiderata=<name> {inner[0]}"
        )


def yaml_location(error: BaseException, args: list[str]) -> str:
    """` (file, line N: key)` for a bad value composed from a config file (`In 'task/bad': ...`).

    The file is looked up in the package's configs and in the `hydra.searchpath` folders given."""
    import re
    from pathlib import Path

    cause = error.__cause__ or error.__context__ or error
    config = re.match(r"In '([\w/]+)'", str(error))
    full_key = getattr(cause, "full_key", None)
    if not (config and isinstance(full_key, str)):
        return ""
    roots = [Path(__file__).parent / "configs"]
    for arg in args:
        if arg.startswith("hydra.searchpath="):
            roots += [Path(p.strip(" '\"")) for p in re.findall(r"file://([^,\]]+)", arg)]
    key = full_key.split(".")[-1]
    for root in roots:
        path = root / f"{config.group(1)}.yaml"
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.match(rf"\s*{re.escape(key)}\s*:", line):
                    return f" ({path}, line {number}: {full_key})"
    return f" ({full_key})"


def complete(args: list[str]) -> None:
    """Shell completion through Hydra's: `eval "$(circuitfind -sc install=bash)"`.

    Hydra's completion script calls `circuitfind -sc query=bash` with the typed line in
    COMP_LINE; the command word is taken out of that line before Hydra reads it.
    """
    words = os.environ.get("COMP_LINE", "").split()
    if any(a.startswith("query") for a in args[1:]):
        typing_command = len(words) < 2 or (len(words) == 2 and not os.environ["COMP_LINE"].endswith(" "))
        if typing_command:
            print(" ".join(c for c in COMMANDS if len(words) < 2 or c.startswith(words[1])))
            return
        if words[1] not in HYDRA_APPS:
            return  # a plain command: the shell's own file-name completion applies
        os.environ["COMP_LINE"] = os.environ["COMP_LINE"].replace(f" {words[1]}", "", 1)
        command = words[1]
    else:
        command = "train"  # install/uninstall: any app prints the same script
    sys.argv = ["circuitfind", *args]
    _app(command)()


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in ("-sc", "--shell-completion"):
        complete(args)
        return
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        from circuitfind.version import __version__

        print(f"circuitfind {__version__}")
        return
    command = args[0]
    if command not in COMMANDS:
        print(f"circuitfind: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    # Hydra re-raises instead of printing its multi-line report, so the error is shown once.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # Hydra's argparse cannot take overrides on both sides of -m; move the flag first.
    rest = args[1:]
    flags = [a for a in rest if a in ("-m", "--multirun")] if command in HYDRA_APPS else []
    sys.argv = ["circuitfind", *flags, *[a for a in rest if a not in flags]]
    try:
        if command == "train":
            check_train_overrides(rest)
            check_run_dir_free(rest)
        _app(command)()
    except KeyboardInterrupt:
        print("circuitfind: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = error_line(e, rest)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))


def error_line(error: BaseException, args: list[str]) -> str | None:
    """The one line shown for an error a user can fix (bad config, bad input, a file system that says no);
    None for anything else, which keeps its traceback."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from circuitfind.errors import CircuitfindError

    if isinstance(error, CircuitfindError):
        return f"circuitfind: error: {error}"
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return f"circuitfind: config error: {one_line(error)}{yaml_location(error, args)}"
    if isinstance(error, yaml.YAMLError):  # a config file that is not YAML: its line and column
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return f"circuitfind: config error: {where}{getattr(error, 'problem', None) or error}"
    if isinstance(error, OSError):  # the file system said no: an unwritable run directory, a full disk
        where = f" {error.filename}" if error.filename else ""
        return f"circuitfind: error: cannot write or read{where}: {error.strerror or error}; check the path"
    return None


if __name__ == "__main__":
    main()
