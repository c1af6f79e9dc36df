"""The README's "Write your own task" example, copied from the README and run exactly as written."""

from __future__ import annotations

import json
import re
import shlex

from conftest import REPO


def readme_example() -> tuple[dict[str, str], list[str]]:
    """The example's files (path -> text) and its command lines, as the README shows them."""
    text = (REPO / "README.md").read_text()
    files = dict(re.findall(r"<!-- example-file: (\S+) -->\n```yaml\n(.*?)```", text, re.S))
    commands = re.findall(r"<!-- example-command -->\n```bash\n(.*?)```", text, re.S)
    return files, [line for block in commands for line in block.splitlines() if line.strip()]


def test_the_write_your_own_task_example_runs_as_written(cli, tmp_path):
    files, commands = readme_example()
    assert set(files) == {"my_tasks/task/difference.yaml", "my_tasks/desiderata/second_operand.yaml"}
    assert commands, "the README must show the command"
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "circuitfind"
        res = cli(*words[1:], env={"OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
    (record,) = (tmp_path / "outputs").glob("train/*/*/circuit.json")
    circuit = json.loads(record.read_text())
    assert circuit["data"]["task"] == "difference"
    assert {"yd_test/acc", "xd_test/acc"} <= set(circuit["metrics"])
    assert circuit["desiderata"]["name"] == "second_operand"
