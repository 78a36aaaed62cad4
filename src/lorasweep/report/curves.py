"""The report's section on per-step training curves a task records beside its loss (curves.csv:
RL's training reward): how each cell's curve moves at each LR (its figure: plots.curve_figure)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lorasweep.analysis.compare import cell_name
from lorasweep.records import Curves, TrialRecord
from lorasweep.report.numbers import fmt
from lorasweep.report.tables import Table

TAIL = 0.1  # the share of steps at each end that the table averages


def by_cell_lr(records: list[TrialRecord], curves: Curves, name: str
               ) -> dict[str, dict[float, list[list[float]]]]:
    """The curve `name` of each complete trial, grouped by cell and LR (one list per seed)."""
    grouped: dict[str, dict[float, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        values = curves.get(record.trial, {}).get(name) if record.trial is not None else None
        if record.status == "complete" and values:
            grouped[cell_name(record.cell)][record.lr].append(values)
    return grouped


def _ends(values: list[float]) -> tuple[float, float]:
    """The mean over the first and the last TAIL of the steps (one step at least)."""
    n = max(1, round(TAIL * len(values)))
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def curve_names(records: list[TrialRecord], curves: Curves) -> list[str]:
    """The curves some complete trial recorded (a diverged trial's curve is in curves.csv but
    in no table or figure: with only such trials there is nothing to draw)."""
    complete = {r.trial for r in records if r.status == "complete" and r.trial is not None}
    return sorted({name for trial, named in curves.items() if trial in complete
                   for name, values in named.items() if values})


def curve_tables(records: list[TrialRecord], curves: Curves, metric_name: str) -> list[Table]:
    """Per curve: each cell and LR's mean over seeds at the start and the end of training,
    beside its validation metric."""
    metric: dict[tuple[str, float], list[float]] = defaultdict(list)
    for record in records:
        if record.status == "complete" and record.metric is not None:
            metric[cell_name(record.cell), record.lr].append(record.metric)
    tables = []
    for name in curve_names(records, curves):
        rows = []
        for cell, by_lr in sorted(by_cell_lr(records, curves, name).items()):
            for lr, runs in sorted(by_lr.items()):
                first, last = np.mean([_ends(v) for v in runs], axis=0)
                rows.append([cell, fmt(lr), str(len(runs)), fmt(first), fmt(last),
                             fmt(float(np.mean(metric[cell, lr])))])
        tables.append(Table(
            f"{name.capitalize()} during training",
            f"Each trial's training {name} per step (curves.csv), averaged over the first and "
            f"the last {TAIL:.0%} of its steps and over seeds, beside the validation "
            f"{metric_name}.",
            ["cell", "lr", "seeds", "start", "end", f"validation {metric_name}"], rows))
    return tables

