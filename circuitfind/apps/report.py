"""`circuitfind report <run or sweep>`: one self-contained HTML page and a Markdown summary.

Every figure is embedded (base64 PNG), so the page can be mailed or attached as it is.
Sections: summary, the paper's figure (accuracy against components patched, over lambda),
then per run the mask heatmap, circuit table, attention of circuit heads and transfer
results, then baselines, faithfulness curves, stability and optimality where computed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from circuitfind.errors import CircuitfindError
from circuitfind.records.rundir import owned


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="circuitfind report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", type=Path, help="a run directory or a sweep directory")
    args = parser.parse_args(argv)
    from circuitfind.records.report import build_report  # matplotlib: only once the arguments are good

    if not args.path.is_dir():
        raise CircuitfindError(f"{args.path} is not a directory; give a run or sweep directory under outputs/")
    replaced = [name for name in ("report.html", "report.md") if (args.path / name).is_file()]
    with owned(args.path, "path"):  # not while a run or an evaluation writes there
        html_path, md_path = build_report(args.path)
    again = (
        f" (replacing the earlier {' and '.join(replaced)}: the page always shows every result there)"
        if replaced
        else ""
    )
    print(f"report written: {html_path} and {md_path}{again}")
