"""The two generated pages of the docs site, so that neither can drift from the code.

- The study-file reference: every field of the pydantic `Study` (lorasweep/config/), section
  by section, with its type, its default and the comment the code gives it.
- The command reference: the help of every `lorasweep` command, from the CLI's own parsers.

As an MkDocs hook (mkdocs.yml `hooks:`), it fills a page's marker line
`<!-- generated: study-file -->` or `<!-- generated: commands -->` when the site builds. As a
script it prints one: `python scripts/docs_reference.py study-file|commands`.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel

from lorasweep.cli import build_parser
from lorasweep.config import OneOf, Study

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
HELP_WIDTH = 100


def study_file_reference() -> str:
    """One table per section of a study file, the top level first."""
    parts, queue, seen = [], [("", Study)], set()
    while queue:
        prefix, model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        title = f"`{prefix.rstrip('.')}`" if prefix else "The top level"
        parts += [f"## {title}", "", _docstring(model), "",
                  "| field | type | default | what it is |", "|---|---|---|---|"]
        comments = _field_comments(model)
        for name, field in model.model_fields.items():
            default = ("required" if field.is_required() else
                       f"`{_value(field.get_default(call_default_factory=True))}`")
            kind = _registered(field.metadata) or (_type(field.annotation)
                                                    + _bounds(field.metadata))
            parts.append(f"| `{name}` | {kind} | {default} | "
                         f"{comments.get(name, '')} |")
            queue += [(f"{prefix}{name}.", sub) for sub in _sections(field.annotation)]
        parts.append("")
    return "\n".join(parts)


def _docstring(model: type[BaseModel]) -> str:
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment on a field's line, or in the lines just above it, in the class's source."""
    comments, above = {}, []
    for line in inspect.getsource(model).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        field = re.match(r"(\w+): [^#]*(?:#\s*(.*))?$", stripped)
        if field and field.group(1) in model.model_fields:
            text = " ".join([*above, field.group(2) or ""]).strip()
            comments[field.group(1)] = text.replace("|", "\\|")
        above = []
    return comments


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The models a field holds (a section, or a list's entries)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _sections(arg)]


def _type(annotation: Any) -> str:
    """A field's type as a reader writes it: `16`, `cosine \\| linear`, list of ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0]) + _bounds(args[1:])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section (below)"
    return getattr(annotation, "__name__", str(annotation))


def _registered(metadata: typing.Iterable[Any]) -> str:
    """A name checked against a registry (kinds.KINDS, variants.VARIANTS): its names, as a
    Literal's values are shown ("" for any other field)."""
    tables = [m.func.table for m in metadata if isinstance(getattr(m, "func", None), OneOf)]
    return " \\| ".join(f"`{name}`" for name in tables[0]) if tables else ""


def _bounds(metadata: typing.Iterable[Any]) -> str:
    """A field's numeric bounds (pydantic's Gt, Ge, ..., also inside a Field), as ` (> 0)`."""
    flat = [m for item in metadata for m in getattr(item, "metadata", [item])]
    bounds = [f"{symbol} {getattr(m, attr)}" for m in flat
              for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
              if getattr(m, attr, None) is not None]
    return f" ({', '.join(bounds)})" if bounds else ""


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, BaseModel):
        return str(value.model_dump(mode="json"))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def command_reference() -> str:
    """Every command's help as `lorasweep COMMAND --help` prints it."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, command in commands.choices.items():
        command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=HELP_WIDTH)
        parts += [f"## `lorasweep {name}`", "", "```text", command.format_help().rstrip(),
                  "```", ""]
    return "\n".join(parts)


GENERATORS = {"study-file": study_file_reference, "commands": command_reference}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs hook: each marker line replaced by the reference it names."""
    return MARKER.sub(lambda match: GENERATORS[match.group(1)](), markdown)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GENERATORS:
        sys.exit(f"usage: python scripts/docs_reference.py {'|'.join(GENERATORS)}")
    print(GENERATORS[sys.argv[1]]())
