"""A report's tables and their Markdown and HTML pages.

The report and `lorasweep curvature` both render through here, so neither imports the other.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from lorasweep.report.answer import AnswerPart


@dataclass
class Table:
    """A titled table; one without rows is its note alone (a section with nothing to show)."""

    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


def markdown_report(title: str, tables: list[Table], figures: list[tuple[str, Path]],
                    answer: list[AnswerPart] = ()) -> str:
    """The Markdown text of a report: a title, the answer, its tables, then its figures."""
    out = [f"# {title}", ""]
    if answer:
        out += [f"## {ANSWER_TITLE}", ""]
        for part in answer:
            if len(part.lines) == 1:
                out.append(f"- **{part.label}**: {part.lines[0]}")
            else:
                out += [f"- **{part.label}**:", *(f"  - {line}" for line in part.lines)]
        out.append("")
    for table in tables:
        out += [f"## {table.title}", "", table.note, ""]
        if table.rows:
            out += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
            out += ["| " + " | ".join(row) + " |" for row in table.rows]
            out.append("")
    for caption, path in figures:
        out += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    return "\n".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; table-layout: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
         overflow-wrap: anywhere; font-size: 0.9em; }
th { background: #f3f3f3; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
p.note { color: #555; max-width: 60em; }
#answer { background: #f4f8fc; border: 1px solid #c9d9ea; border-radius: 6px;
          padding: 0.2em 1.2em 0.8em; margin: 1em 0 2em; }
#answer dt { font-weight: 600; margin-top: 0.6em; }
#answer dd { margin: 0.15em 0 0 1.2em; max-width: 60em; }
"""
ANSWER_TITLE = "Answer"


def html_report(title: str, tables: list[Table], figures: list[tuple[str, Path]],
                answer: list[AnswerPart]) -> str:
    """The same page as HTML, figures embedded, so it opens from disk alone."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>",
           f"<section id='answer'><h2>{ANSWER_TITLE}</h2><dl>"]
    for part in answer:
        out.append(f"<dt>{e(part.label)}</dt>" + "".join(f"<dd>{e(line)}</dd>"
                                                         for line in part.lines))
    out.append("</dl></section>")
    for table in tables:
        out.append(f"<h2>{e(table.title)}</h2><p class='note'>{e(table.note)}</p>")
        if not table.rows:
            continue
        out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                for row in table.rows]
        out.append("</table>")
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        out.append(f"<h2>{e(caption)}</h2><img alt='{e(caption)}' "
                   f"src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)
