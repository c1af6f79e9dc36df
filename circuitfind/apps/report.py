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

from circuitfind.records.report import build_report


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="circuitfind report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", type=Path, help="a run directory or a sweep directory")
    args = parser.parse_args(argv)
    html_path, md_path = build_report(args.path)
    print(f"report written: {html_path} and {md_path}")
