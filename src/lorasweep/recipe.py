"""Recipe axes: what a cell changes in the study's train section, and the data it trains on.

A cell's `recipe` is only ever its values on the study's `search.recipe` axes, as canonical
text (`batch_size=32;train_examples=1000`, axes in name order). The text is part of the cell
key, so trials of different recipes never share a fused group (batch size, sequence length and
data subset change shapes and data order) and a cell with no recipe axes keeps the key it always
had. How a trial trains (`Training`) is the study's `train` section (a `TrainSpec`, named `train`
wherever it is passed) with the cell's values put in; `train_examples` picks the first N of the
seeded shuffle of the training examples, so a larger subset contains a smaller one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorasweep.config import DATA_AXIS, RECIPE_TRAIN_AXES, TrainSpec

NONE_TEXT = "none"
Value = int | float | str | None


def value_text(value: Value) -> str:
    """A recipe value as it appears in a cell key: the shortest text that reads back the same."""
    if value is None:
        return NONE_TEXT
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def recipe_text(values: dict[str, Value]) -> str | None:
    """The canonical text of a cell's recipe values; None when the cell has none."""
    if not values:
        return None
    return ";".join(f"{axis}={value_text(values[axis])}" for axis in sorted(values))


def parse_value(text: str) -> Value:
    if text == NONE_TEXT:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_recipe(text: str | None) -> dict[str, Value]:
    """The recipe values of a cell from its text (an empty dict for a cell with none)."""
    if not text:
        return {}
    pairs = (part.partition("=") for part in text.split(";"))
    return {axis: parse_value(value) for axis, _, value in pairs}


@dataclass(frozen=True)
class Training:
    """How one trial trains: the resolved train section and the size of its training subset."""

    train: TrainSpec
    train_examples: int | None = None


def resolve_training(train: TrainSpec, recipe: str | None) -> Training:
    """The study's train section with a cell's recipe values put in."""
    values = parse_recipe(recipe)
    update: dict[str, Any] = {k: v for k, v in values.items() if k in RECIPE_TRAIN_AXES}
    # Sweeping the training length in one unit replaces the other.
    if "steps" in update:
        update["epochs"] = None
    if "epochs" in update:
        update["steps"] = None
    resolved = TrainSpec.model_validate({**train.model_dump(), **update})
    examples = values.get(DATA_AXIS)
    return Training(train=resolved, train_examples=None if examples is None else int(examples))


def is_numeric(value: Value) -> bool:
    """Whether a recipe value can be placed on a log axis (a power-law fit needs x > 0)."""
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
