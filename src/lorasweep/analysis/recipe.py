"""How the optimal LR moves with the recipe: lr_star = c * x^k for each swept numeric axis.

For every recipe axis (batch size, steps, epochs, training-set size, sequence length, ...) the
cells that differ only in that axis form a series; log10 lr_star = log10 c + k log10 x is fitted
through the series' per-cell optima (analysis/optima.py) by least squares. The interval of k is a
bootstrap over seeds: each draw resamples whole seeds inside every cell, re-refines each cell's
lr_star and refits k (so it carries the noise of the optima themselves); with one seed per cell
it is the t interval of the regression slope (three axis values or more), else none.

`AxisFit.transfer` moves a tuned LR to another axis value along the fitted power law: what
`lorasweep suggest` answers to "I doubled my batch size, what LR now?".
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from lorasweep.analysis.optima import (
    Optimum,
    bootstrap_lr_star,
    cell_curves,
    curve_table,
    find_optima,
)
from lorasweep.recipe import is_numeric, parse_recipe, recipe_text
from lorasweep.records import TrialRecord
from lorasweep.space import Cell

BOOTSTRAP_SAMPLES = 1000
# Exponents to print beside a fit. Batch size: the square-root and linear rules, and "Learning
# Rate Matters" v2 on Gemma-3-1B (2e-4 at B=16 to 1.1e-3 at B=128: log 5.5 / log 8 = 0.82).
# Training-set size: the same paper's 3.1x fall from 5k to 395k examples (-log 3.1 / log 79).
REFERENCES: dict[str, dict[str, float]] = {
    "batch_size": {"sqrt(B)": 0.5, "B": 1.0, "LRM v2": math.log(1.1e-3 / 2e-4) / math.log(8)},
    "train_examples": {"LRM v2": -math.log(3.1) / math.log(395 / 5)},
}


@dataclass
class AxisFit:
    """lr_star against one recipe axis, for cells equal in everything else (`series`)."""

    axis: str
    series: Cell  # what the series' cells share: every field, the axis left out of the recipe
    values: list[float]  # the axis values, ascending
    lr_stars: list[float]
    peaks: list[float]  # each cell's metric at its best grid LR (mean over seeds)
    exponent: float  # k
    coefficient: float  # c
    low: float | None  # 95% interval of k
    high: float | None
    interval: str  # "bootstrap over seeds", "t", or "" (none)

    def predict(self, value: float) -> float:
        """The fitted optimal LR at an axis value."""
        return self.coefficient * value ** self.exponent

    def transfer(self, lr: float, from_value: float, to_value: float,
                 exponent: float | None = None) -> float:
        """A tuned LR at `from_value` moved to `to_value` by the fitted exponent (or another,
        such as an end of its interval)."""
        k = self.exponent if exponent is None else exponent
        return lr * (to_value / from_value) ** k

    @property
    def references(self) -> dict[str, float]:
        return REFERENCES.get(self.axis, {})


def _series(optima: list[Optimum]) -> dict[tuple[str, Cell], list[tuple[float, Optimum]]]:
    """(axis, what else is fixed) -> [(axis value, optimum)] for every numeric recipe axis."""
    series: dict[tuple[str, Cell], list[tuple[float, Optimum]]] = defaultdict(list)
    for optimum in optima:
        values = parse_recipe(optimum.cell.recipe)
        for axis, value in values.items():
            if is_numeric(value):
                others = recipe_text({a: v for a, v in values.items() if a != axis})
                series[(axis, replace(optimum.cell, recipe=others))].append((float(value),
                                                                             optimum))
    return series


def _series_order(item: tuple[tuple[str, Cell], list]) -> str:
    """Series in the order the report has always listed them: by axis, then by the text of
    what they share (numbers as text, so rank 16 comes before rank 4)."""
    axis, series = item[0]
    shared = tuple((f, v) for f, v in series.to_row().items() if f != "recipe")
    return str((axis, shared + tuple(sorted(parse_recipe(series.recipe).items()))))


def fit_power_law(values: np.ndarray, lr_stars: np.ndarray) -> tuple[float, float]:
    """(k, c) of lr_star = c * value^k by least squares in log-log."""
    k, log_c = np.polyfit(np.log10(values), np.log10(lr_stars), 1)
    return float(k), float(10 ** log_c)


def fit_recipe_axes(records: list[TrialRecord], maximize: bool, seed: int = 0,
                    samples: int = BOOTSTRAP_SAMPLES,
                    optima: list[Optimum] | None = None) -> list[AxisFit]:
    """One power-law fit of lr_star per swept numeric recipe axis and per series of cells that
    differ only in it (two axis values or more); `optima`: the records' (find_optima with the
    same seed), where the caller has them already."""
    optima = find_optima(records, maximize, seed) if optima is None else optima
    curves, _ = cell_curves(records)
    rng = np.random.default_rng(seed)
    fits = []
    for (axis, series), members in sorted(_series(optima).items(), key=_series_order):
        members.sort(key=lambda m: m[0])
        if len(members) < 2:
            continue
        x = np.array([value for value, _ in members])
        stars = np.array([o.lr_star for _, o in members])
        k, c = fit_power_law(x, stars)
        tables = [curve_table(curves[o.cell]) for _, o in members]
        low = high = None
        kind = ""
        if all(len(table) > 1 for _, table in tables):
            draws = [fit_power_law(x, np.array([bootstrap_lr_star(lrs, table, maximize, rng)
                                                for lrs, table in tables]))[0]
                     for _ in range(samples)]
            low, high = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
            kind = "bootstrap over seeds"
        elif len(members) > 2:
            fit = stats.linregress(np.log10(x), np.log10(stars))
            half = stats.t.ppf(0.975, len(members) - 2) * fit.stderr
            low, high, kind = k - half, k + half, "t"
        fits.append(AxisFit(axis=axis, series=series, values=x.tolist(),
                            lr_stars=stars.tolist(), peaks=[o.peak for _, o in members],
                            exponent=k, coefficient=c, low=low, high=high, interval=kind))
    return fits
