"""A report page built as HTML and Markdown side by side."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, List, Sequence

from circuitfind.records.sweep import format_value as fmt


def markdown_table(columns: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, each cell as str() gives it."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


class Page:
    """Builds the HTML and the Markdown side by side."""

    def __init__(self, title: str, root: Path):
        self.root = root
        self.html: List[str] = [f"<h1>{html.escape(title)}</h1>"]
        self.md: List[str] = [f"# {title}", ""]

    def section(self, anchor: str, title: str) -> None:
        self.html.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        self.md += [f"## {title}", ""]

    def text(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        self.md += [markdown_table(columns, [[fmt(v) for v in r] for r in rows]), ""]

    def details(self, summary: str, text: str) -> None:
        """A collapsed block of preformatted text (the composed config)."""
        self.html.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")
        self.md += [f"<details><summary>{summary}</summary>", "", "```", text.rstrip(), "```", "", "</details>", ""]

    def image(self, path: Path, alt: str) -> None:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>"
        )
        self.md += [f"![{alt}]({Path(path).relative_to(self.root)})", ""]

    def render(self) -> str:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
            "padding:3px 7px;text-align:right}th{background:#f4f4f4}img{max-width:100%}"
            "figcaption{font-size:12px;color:#555}"
        )
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>circuitfind report</title>"
            f"<style>{style}</style></head><body>{''.join(self.html)}</body></html>\n"
        )
