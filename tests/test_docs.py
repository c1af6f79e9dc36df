"""The README and docs/ as a user reads them: every command composes, every file named exists, the
examples run as written, and the site builds."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import REPO, compose

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_A_VALUE = ("...", "…")  # a placeholder the reader fills in


SHELL = ("", "bash", "sh", "shell", "console")


def code_lines(page: Path) -> List[str]:
    """The lines of a page's shell code blocks, continuation lines joined."""
    blocks: List[List[str]] = []
    language = None  # the open fence's language, None outside a block
    for line in page.read_text().splitlines():
        fence = re.match(r"\s*(```|~~~)(\w*)", line)
        if fence and language is None:
            language = fence.group(2)
            blocks.append([])
        elif fence:  # a closing fence: a block's end, whatever its language (```python closes as ``` too)
            if language not in SHELL:
                blocks.pop()
            language = None
        elif language is not None:
            blocks[-1].append(line)
    lines = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", "\n".join(block))
        lines += [line.strip() for line in joined.splitlines() if line.strip()]
    return lines


def commands(program: str) -> List[Tuple[str, List[str]]]:
    """(page, words) of every `<program> ...` line of the docs, comments removed."""
    out = []
    for page in PAGES:
        for line in code_lines(page):
            if line.startswith(program + " "):
                out.append((page.name, shlex.split(line, comments=True)[1:]))
    return out


def train_overrides(words: List[str]) -> List[str]:
    """The overrides of a train command line as one run would take them: flags dropped, placeholders
    left out, a sweep's first value."""
    out = []
    for word in words:
        if word.startswith("-") or word in NOT_A_VALUE or word.split("=", 1)[-1] in NOT_A_VALUE or "=" not in word:
            continue
        key, value = word.split("=", 1)
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]  # -m a,b,c: the first job
        out.append(f"{key}={value}")
    return out


# A command reading the user's own config folder (hydra.searchpath) needs its files: the write-your-own-task
# example runs it end to end with them (test_the_write_your_own_task_example_runs_as_written).
TRAIN = [
    (page, words)
    for page, words in commands("circuitfind")
    if words and words[0] == "train" and not any("hydra.searchpath" in w for w in words)
]
EVAL = [(page, words) for page, words in commands("circuitfind") if words and words[0] == "eval"]


@pytest.mark.parametrize("page,words", TRAIN, ids=[" ".join(w)[:80] for _, w in TRAIN])
def test_every_train_command_in_the_docs_composes_and_validates(page, words):
    from circuitfind.config.validation import normalised, validate

    overrides = [o for o in train_overrides(words[1:]) if not o.startswith("hydra")]
    validate(normalised(compose(*overrides)))


@pytest.mark.parametrize("page,words", EVAL, ids=[" ".join(w)[:80] for _, w in EVAL])
def test_every_eval_command_in_the_docs_is_well_formed(page, words):
    from circuitfind.apps.eval import circuit_spec
    from circuitfind.config.validation import normalised, validate

    flags = [w for w in words[1:] if w.startswith("--")]
    assert set(flags) <= {"--n-test", "--out"}, flags
    items = [w for w in words[1:] if not w.startswith("--") and not w.isdigit()]
    runs = [i for i in items if "=" not in i]
    assert len(runs) <= 1
    circuit = [i.split("=", 1)[1] for i in items if i.startswith("circuit=")]
    assert runs or circuit, "an eval command names a run or a circuit"
    if not runs:  # composed as train composes it
        validate(normalised(compose(*[i for i in items if "=" in i and not i.startswith("circuit=")])))
        spec = circuit_spec(circuit[0])
        assert isinstance(spec, list) or spec.endswith((".safetensors", ".json"))


def test_every_make_target_and_script_in_the_docs_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    for page in PAGES:
        lines = code_lines(page) + re.findall(r"`(make [a-z-]+)`", page.read_text())
        for line in [line for line in lines if line.startswith(("make ", "python "))]:
            words = shlex.split(line, comments=True)
            if words[:1] == ["make"]:
                assert words[1] in targets, f"{page.name}: make {words[1]}"
            if words[:1] == ["python"] and words[1].endswith(".py"):
                assert (REPO / words[1]).is_file(), f"{page.name}: {words[1]}"


def test_every_file_the_docs_name_exists():
    pattern = re.compile(r"`((?:circuitfind|configs|scripts|tests|docs|\.ci)/[\w./-]*[\w/])`")
    missing = []
    for page in PAGES:
        for path in pattern.findall(page.read_text()):
            if not (REPO / path).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, missing


def architecture_layout() -> set:
    """The files docs/architecture.md's layout names, as paths: a name under `  package/` is that
    package's, `  name.py` is the top package's, `scripts/name.py` is itself."""
    block = (REPO / "docs" / "architecture.md").read_text().split("## Layout", 1)[1].split("```")[1]
    named, package = set(), ""
    for line in block.splitlines():
        head = line.strip().split(" ")[0]
        if line.startswith("  ") and not line.startswith("   "):  # a top-level entry: a package or a module
            package = head if head.endswith("/") else ""
        for name in re.findall(r"(?<![\w<>])([\w/]+\.py)\b", line):
            named.add(name if name.startswith("scripts/") else f"circuitfind/{package}{name}")
    return named


def test_the_architecture_page_names_every_module_and_script():
    """docs/architecture.md's layout is where a reader finds a module's job: a new one must be there."""
    files = [p for p in (REPO / "circuitfind").rglob("*.py") if p.name != "__init__.py"]
    files += list((REPO / "scripts").glob("*.py"))
    named = architecture_layout()
    missing = sorted(str(p.relative_to(REPO)) for p in files if str(p.relative_to(REPO)) not in named)
    assert not missing, f"add to docs/architecture.md's layout: {missing}"
    gone = sorted(n for n in named if not (REPO / n).is_file())
    assert not gone, f"docs/architecture.md's layout names files that are not there: {gone}"


def test_every_relative_link_in_the_docs_points_at_a_file():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                missing.append(f"{page.name}: {target}")
    assert not missing, missing


def example(marker: str, page: Path) -> Dict[str, List[str]]:
    """The files and command lines under `<!-- marker... -->` comments of a page."""
    text = page.read_text()
    files = dict(re.findall(rf"<!-- {marker}-file: (\S+) -->\n```yaml\n(.*?)```", text, re.S))
    blocks = re.findall(rf"<!-- {marker}(?:-command)? -->\n```bash\n(.*?)```", text, re.S)
    return {"files": files, "commands": [line for block in blocks for line in block.splitlines() if line.strip()]}


def run_as_written(lines: List[str], cli) -> None:
    for command in lines:
        words = shlex.split(command, comments=True)
        assert words[0] == "circuitfind"
        res = cli(*words[1:])
        assert res.returncode == 0, f"{command}\n{res.stderr[-2000:]}"


def test_the_worked_example_runs_as_written(cli, tmp_path):
    lines = example("worked-example", REPO / "README.md")["commands"]
    assert [shlex.split(line)[1] for line in lines] == ["train", "eval", "report"]
    run_as_written(lines, cli)
    run = tmp_path / "outputs" / "example"
    for name in ("circuit.json", "mask.safetensors", "eval.json", "report.html", "report.md"):
        assert (run / name).is_file(), name
    evaluation = json.loads((run / "eval.json").read_text())
    assert set(evaluation["ablations"]) == {"patching", "mean"}
    circuit = json.loads((run / "circuit.json").read_text())["circuit"]
    assert sorted(evaluation["circuit"]) == sorted(row["name"] for row in circuit)


def test_the_write_your_own_task_example_runs_as_written(cli, tmp_path):
    found = example("example", REPO / "docs" / "tasks.md")
    assert set(found["files"]) == {"my_tasks/task/difference.yaml", "my_tasks/desiderata/second_operand.yaml"}
    for path, content in found["files"].items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    run_as_written(found["commands"], cli)
    (record,) = (tmp_path / "outputs").glob("train/*/*/circuit.json")
    circuit = json.loads(record.read_text())
    assert circuit["data"]["task"] == "difference"
    assert {"yd_test/acc", "xd_test/acc"} <= set(circuit["metrics"])
    assert circuit["desiderata"]["name"] == "second_operand"


@pytest.mark.e2e
def test_the_docs_site_builds_with_its_api_reference(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("the docs tools are not installed: pip install -e '.[docs]' (make docs does)")
    res = subprocess.run(
        [str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True
    )
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "circuitfind" / "runs" / "train" / "index.html").is_file()
