"""Generate the API reference pages from the package tree (run by mkdocs-gen-files).

Every module under circuitfind/ gets a page reference/<module path>.md holding
`::: circuitfind.x.y`, for mkdocstrings to fill from its docstrings; a package gets one
when its __init__.py has a docstring. Nothing is imported and no module name is written here,
so the reference follows the package as it moves. circuitfind/configs and circuitfind/assets
hold data, not code, and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "circuitfind"
SKIPPED = {"configs", "assets", "__pycache__"}

nav = mkdocs_gen_files.Nav()

for path in sorted(PACKAGE.rglob("*.py")):
    relative = path.relative_to(ROOT)
    if SKIPPED & set(relative.parts[1:-1]):
        continue
    parts = relative.with_suffix("").parts
    doc_path = relative.with_suffix(".md")
    if parts[-1] == "__main__":
        continue
    if parts[-1] == "__init__":
        if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None:
            continue
        parts = parts[:-1]
        doc_path = doc_path.with_name("index.md")
    nav[parts] = doc_path.as_posix()
    with mkdocs_gen_files.open(Path("reference", doc_path), "w") as page:
        page.write(f"::: {'.'.join(parts)}\n")
    mkdocs_gen_files.set_edit_path(Path("reference", doc_path), relative)

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())
