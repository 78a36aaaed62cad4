"""`trainer.result.key`: where an external command's metric sits in the JSON it reports.

A key is a JSONPath (parsed by jsonpath-ng) that names one value: names joined by dots, each
quoted where it holds a dot or another character a bare name cannot (`"lora:0.001".val_loss`),
and list indexes (`results[0].eval_loss`; `results.0.eval_loss`, a number as a name, indexes a
list too, as keys did before they were JSONPaths). A name may be a template over the trial's
values (`"lora:{lr:.3g}".val_loss`), rendered after the key is parsed, so a value with a dot in
it stays one name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jsonpath_ng import parse
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.jsonpath import Child, Fields, Index, Root

# One step of a key: a name (a template until rendered) or a list index.
Step = str | int
FORM = ("names joined by dots, quoted where they hold other characters "
        "(\"lora:{lr:.3g}\".val_loss), and list indexes ([0])")


def parse_key(text: str) -> tuple[Step, ...]:
    """The steps of a key; ValueError, saying what a key may hold, for any other form."""
    try:
        steps = tuple(_steps(parse(text)))
    except (JsonPathLexerError, JsonPathParserError, ValueError):
        raise ValueError(f"'{text}' is not a key: give {FORM}") from None
    if not steps:
        raise ValueError(f"'{text}' names no value: give {FORM}")
    return steps


def _steps(expression: Any) -> list[Step]:
    if isinstance(expression, Child):
        return _steps(expression.left) + _steps(expression.right)
    if isinstance(expression, Root):
        return []
    if isinstance(expression, Fields) and len(expression.fields) == 1:
        return [expression.fields[0]]
    if isinstance(expression, Index) and len(expression.indices) == 1:
        return [expression.indices[0]]
    raise ValueError("not one value")  # a wildcard (`a.*`), slice, union, filter or `this`


def render_key(steps: tuple[Step, ...], render: Callable[[str], str]) -> tuple[Step, ...]:
    """The key of one trial: each name rendered (`render` fills in the trial's values)."""
    return tuple(render(step) if isinstance(step, str) else step for step in steps)


def find(data: Any, steps: tuple[Step, ...]) -> tuple[Any, Any] | None:
    """The value at `steps` in `data` and the object or list that holds it; None where there
    is none."""
    holder, value = None, data
    for step in steps:
        holder = value
        try:
            if isinstance(value, list):
                value = value[int(step)]
            elif isinstance(value, dict) and isinstance(step, str):
                value = value[step]
            else:
                return None
        except (KeyError, IndexError, ValueError):
            return None
    return value, holder


def key_text(steps: tuple[Step, ...]) -> str:
    """A rendered key as a JSONPath, for messages: `"lora:0.001".val_loss`, `results[0].x`."""
    text = ""
    for step in steps:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            name = step if step.isidentifier() else json.dumps(step)
            text += f".{name}" if text else name
    return text
