"""One finished trial as a tracker logs it: trials.csv's row of it (params: what the trial is;
metrics: what it measured, the same numbers) and its curves by step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from lorasweep.analysis.compare import cell_name
from lorasweep.space import CELL_FIELDS, Cell

KEY_TAG = "lorasweep.trial_key"  # a run's tag (MLflow) holding its trial's key
# trials.csv columns that say what the trial is (params) rather than what it measured
PARAM_COLUMNS = ("trial", *CELL_FIELDS, "lr", "seed")
TEXT_COLUMNS = ("status", "worker", "reason", "attempts")


@dataclass(frozen=True)
class TrackedTrial:
    """One finished trial as a tracker logs it."""

    key: str  # the trial's key in the store: the run's identity
    name: str  # cell, LR and seed, as a person reads them
    cell: str  # the cell's name: runs of one cell group together
    status: str
    steps: int  # the step its final metrics are logged at
    params: dict[str, str | int | float]
    metrics: dict[str, float]  # trials.csv's numbers
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name -> by step


def tracked_trial(row: dict, attrs: dict) -> TrackedTrial:
    """A trials.csv row (records.trial_row) and the trial's record, as a run."""
    cell = Cell.from_row(row)
    params = {name: row[name] for name in PARAM_COLUMNS if row.get(name) not in (None, "")}
    metrics = {name: number for name, value in row.items()
               if name not in PARAM_COLUMNS and name not in TEXT_COLUMNS
               and (number := _number(value)) is not None}
    curves: dict[str, list[tuple[int, float]]] = {}
    loss = attrs.get("loss_curve") or []
    if loss:
        curves["curve/loss"] = _points(enumerate(loss, start=1))
    for name, values in (attrs.get("curves") or {}).items():
        curves[f"curve/{name}"] = _points(enumerate(values, start=1))
    for evaluation in attrs.get("eval_curve") or []:
        for name, value in evaluation.items():
            if name != "step" and (number := _number(value)) is not None:
                curves.setdefault(f"eval/{name}", []).append((int(evaluation["step"]), number))
    name = cell_name(cell)
    return TrackedTrial(key=str(attrs["trial_key"]), name=f"{name} lr={row['lr']:.3g} "
                        f"seed={row['seed']}", cell=name, status=str(row["status"]),
                        steps=int(_number(row.get("steps")) or 0), params=params,
                        metrics=metrics, curves={k: v for k, v in curves.items() if v})


def _number(value: object) -> float | None:
    """A logged number: finite or not (Optuna keeps NaN and inf as text), None for no number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _points(pairs: Iterable[tuple[int, object]]) -> list[tuple[int, float]]:
    return [(step, number) for step, value in pairs
            if (number := _number(value)) is not None and math.isfinite(number)]
