"""Self-contained HTML reports: one file with inline CSS and PNG figures embedded as base64, so it
opens from disk, offline, and can be mailed as it is. Every text is HTML-escaped.

A report is a list of sections, each built from the small helpers below:

    write_report("report.html", "Title", [
        section("Results", paragraph("..."), table(headers, rows, bold={(0, 2)})),
        section("Plots", image("plot.png", "caption")),
    ])
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .io import write_text

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { white-space: normal; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
td.best { font-weight: bold; background: #e6f4e6 !important; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
.example { border: 1px solid #ddd; border-radius: 4px; padding: .6em 1em; margin: 1em 0; }
.example .meta { font-size: .85em; color: #555; }
.example pre { white-space: pre-wrap; font-family: Menlo, Consolas, monospace; font-size: .9em; margin: .4em 0; }
.example s { color: #c0392b; background: #fdecea; }
.muted { color: #777; font-size: .85em; }
summary { cursor: pointer; color: #555; }
li { margin: .2em 0; }
"""


@dataclass
class TokenExample:
    """A training sample with each response token marked kept or pruned by Stage 2.

    tokens: (text, kept, token perplexity) per response token, in order.
    """

    sample_id: int
    category: str
    prompt: str
    tokens: list[tuple[str, bool, float]]
    ppl: float
    ent: float
    r_sample: float
    r_token: float


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def bullets(items: Sequence[str]) -> str:
    """A bulleted list of plain texts."""
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def details(summary: str, *parts: str) -> str:
    """`parts` folded under a line that unfolds them when clicked (no script: HTML's own <details>)."""
    return f"<details><summary>{html.escape(summary)}</summary>{''.join(parts)}</details>"


def table(headers: Sequence[str], rows: Sequence[Sequence], *, bold: set[tuple[int, int]] = frozenset()) -> str:
    """An HTML table; the (row, column) cells in `bold` are emphasised (class "best"). Its headers
    wrap so that it fits the page where it can; a table still wider scrolls on its own."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="best">{html.escape(str(c))}</td>' if (i, j) in bold
                        else f"<td>{html.escape(str(c))}</td>" for j, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def image(png: str | Path | bytes, caption: str = "") -> str:
    """A figure with the PNG (a path or its bytes) embedded as a data: URI."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    encoded = base64.b64encode(data).decode("ascii")
    alt = html.escape(caption or "figure", quote=True)
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}">{text}</figure>'


def token_example(example: TokenExample) -> str:
    """The prompt, then the response with pruned tokens struck through (<s>); hovering a token shows
    its perplexity under the scoring model."""
    parts = []
    for text, kept, tokppl in example.tokens:
        title = html.escape(f"token perplexity {tokppl:.3g}", quote=True)
        tag = "span" if kept else "s"
        parts.append(f'<{tag} title="{title}">{html.escape(text)}</{tag}>')
    pruned = sum(not kept for _, kept, _ in example.tokens)
    meta = (f"sample {example.sample_id} &middot; category {html.escape(example.category)} &middot; "
            f"PPL {example.ppl:.3g}, entropy {example.ent:.3g} &middot; {pruned} of {len(example.tokens)} "
            f"response tokens pruned")
    return (f'<div class="example"><div class="meta">{meta}</div>'
            f"<pre>{html.escape(example.prompt)}</pre><pre>{''.join(parts)}</pre></div>")


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def render_report(title: str, sections: Sequence[str]) -> str:
    """The whole HTML document."""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"muted\">Generated by qtune on {stamp}.</p>"
        + "".join(sections) + "</body></html>\n"
    )


def write_report(path: str | Path, title: str, sections: Sequence[str]) -> Path:
    """Write the report atomically and return its path."""
    path = Path(path)
    write_text(path, render_report(title, sections))
    return path
