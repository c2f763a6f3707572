"""Render the report's blocks (headings, text, tables, figures) as Markdown and as one HTML page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from maxact.reports.tables import Table
from maxact.text import visible


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Text:
    """A paragraph of plain text (no markup; escaped in both pages)."""

    text: str


@dataclass
class Figure:
    """A PNG beside the pages: ``src`` is its file name, ``alt`` its description, ``caption`` shown below."""

    src: str
    alt: str
    caption: str = ""


Block = Heading | Text | Table | Figure

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.6em 0 0.3em; font-size: 0.88em; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
td { font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }
p.note { font-size: 0.85em; color: #555; margin-top: 0.2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #444; }
.scroll { overflow-x: auto; }
"""


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\*`["} | {"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _md(text: str) -> str:
    """Text shown literally in Markdown, on one line: backslash escapes for ``\\ * ` [``, ``& < >`` as
    HTML entities (so no HTML of the text is ever raw in the page), bidirectional controls made visible."""
    return visible(text).translate(_MD_SPECIAL).replace("\n", " ")


def _md_cell(text: str) -> str:
    """:func:`_md` inside a Markdown table cell: ``|`` escaped too."""
    return _md(text).replace("|", "\\|")


def _esc(text: str) -> str:
    """Text shown literally in HTML: escaped, bidirectional controls made visible."""
    return html.escape(visible(text))


def markdown(title: str, blocks: Sequence[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown; figures as ``![alt](src)`` with their caption below."""
    out = [f"# {_md(title)}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + _md(b.text), ""]
        elif isinstance(b, Text):
            out += [_md(b.text), ""]
        elif isinstance(b, Figure):
            out += [f"![{_md_cell(b.alt)}]({b.src})", ""]
            if b.caption:
                out += [f"*{_md(b.caption)}*", ""]
        elif isinstance(b, Table):
            out += [f"**{_md(b.title)}**", ""]
            header = [c or " " for c in b.columns]
            out.append("| " + " | ".join(_md_cell(c) for c in header) + " |")
            out.append("|" + "|".join(":---" if j in b.align_left else "---:" for j in range(len(header))) + "|")
            for r in range(len(b.rows)):
                out.append("| " + " | ".join(_md_cell(b.cell(r, c)) for c in range(len(header))) + " |")
            out.append("")
            if b.note:
                out += [_md(b.note), ""]
    return "\n".join(out).rstrip() + "\n"


def _html_table(t: Table) -> str:
    esc = _esc
    cls = lambda j: ' class="l"' if j in t.align_left else ""  # noqa: E731
    head = "".join(f"<th{cls(j)}>{esc(c)}</th>" for j, c in enumerate(t.columns))
    body = "\n".join(
        "<tr>" + "".join(f"<td{cls(c)}>{esc(t.cell(r, c))}</td>" for c in range(len(t.columns))) + "</tr>"
        for r in range(len(t.rows))
    )
    headrow = f"<thead><tr>{head}</tr></thead>" if any(t.columns) else ""
    note = f'<p class="note">{esc(t.note)}</p>' if t.note else ""
    return (f'<div class="scroll"><table><caption>{esc(t.title)}</caption>{headrow}<tbody>\n{body}\n</tbody>'
            f"</table></div>{note}")


def html_page(title: str, blocks: Sequence[Block]) -> str:
    """The blocks as one HTML5 page: inline CSS, no script, no external resource except the PNG
    files named by the figures (relative paths beside the page)."""
    esc = _esc
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{esc(b.anchor)}"' if b.anchor else ""
            parts.append(f"<h{b.level}{anchor}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            parts.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Figure):
            cap = f"<figcaption>{esc(b.caption)}</figcaption>" if b.caption else ""
            parts.append(f'<figure><img src="{esc(b.src)}" alt="{esc(b.alt)}">{cap}</figure>')
        elif isinstance(b, Table):
            parts.append(_html_table(b))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f'<link rel="icon" href="data:,">\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n'
            f"{body}\n</body>\n</html>\n")
