"""The optimal LR of each cell, refined between grid points, with an interval from the seeds.

A cell's curve is its validation metric against LR, averaged over seeds. The best grid LR is
refined by a parabola in log10(LR) through the best point and its two neighbours (when the best
point is interior and the parabola opens the right way). The interval comes from a bootstrap over
seeds: resample whole seeds (each seed's curve over the grid), redo the refinement, take the
2.5th and 97.5th percentiles. A best LR at the end of the grid is flagged, with the LRs to add.
An LR that search.stop_early stopped at a rung stays on the grid with no value, so a best LR
beside it is not refined (there is no third point) and is flagged `stopped`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import numpy as np

from lorasweep.recipe import parse_recipe
from lorasweep.records import Optimum, TrialRecord
from lorasweep.space import Cell

BOOTSTRAP_SAMPLES = 1000


def refine(lrs: np.ndarray, values: np.ndarray, maximize: bool) -> tuple[int, float]:
    """Index of the best grid point and the parabola-refined LR (the grid LR when it cannot be
    refined). `values` may hold NaN for LRs without a finished trial."""
    sign = 1.0 if maximize else -1.0
    scored = np.where(np.isnan(values), -np.inf, sign * values)
    best = int(np.argmax(scored))
    if best == 0 or best == len(lrs) - 1 or not np.isfinite(scored[best - 1:best + 2]).all():
        return best, float(lrs[best])
    x = np.log10(lrs[best - 1:best + 2])
    curvature, slope, _ = np.polyfit(x, scored[best - 1:best + 2], 2)
    if curvature >= 0:  # flat or opening the wrong way: no interior maximum to refine to
        return best, float(lrs[best])
    vertex = float(np.clip(-slope / (2 * curvature), x[0], x[2]))
    return best, 10 ** vertex


def _mean_curve(table: np.ndarray) -> np.ndarray:
    """Mean over seeds (rows) per LR, skipping missing trials; NaN where an LR has none or a
    diverged seed (stored as inf), so such an LR is never the best."""
    with warnings.catch_warnings():  # an LR no seed finished is NaN here, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(table, axis=0)
    return np.where(np.isinf(mean), np.nan, mean)


def curve_table(by_seed: dict[int, dict[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The cell's LRs (sorted) and its (seeds x LRs) table of metrics, NaN where missing."""
    lrs = np.array(sorted({lr for curve in by_seed.values() for lr in curve}))
    table = np.array([[by_seed[s].get(lr, np.nan) for lr in lrs] for s in sorted(by_seed)])
    return lrs, table


def bootstrap_lr_star(lrs: np.ndarray, table: np.ndarray, maximize: bool,
                      rng: np.random.Generator) -> float:
    """lr_star of one bootstrap draw: whole seeds (rows of the table) resampled."""
    sample = table[rng.integers(0, len(table), len(table))]
    return refine(lrs, _mean_curve(sample), maximize)[1]


def cell_optimum(cell: Cell, by_seed: dict[int, dict[float, float]], diverged: int,
                 maximize: bool, rng: np.random.Generator,
                 stopped: frozenset[float] = frozenset()) -> Optimum:
    """The optimum of one cell from {seed: {lr: metric}} of its complete trials (`stopped`:
    the LRs search.stop_early stopped, NaN in `by_seed`)."""
    lrs, table = curve_table(by_seed)
    seeds = sorted(by_seed)
    # A diverged trial is recorded as -inf/+inf (the worst score): an LR where any seed diverged
    # averages to the worst and cannot be an optimum; a missing trial (NaN) is just skipped.
    mean = _mean_curve(table)
    best, lr_star = refine(lrs, mean, maximize)
    at_best = table[:, best][np.isfinite(table[:, best])]
    low = high = None
    if len(seeds) > 1:
        stars = []
        for _ in range(BOOTSTRAP_SAMPLES):
            stars.append(bootstrap_lr_star(lrs, table, maximize, rng))
        # on the LRs themselves, not their logs: when the draws agree the interval is exactly
        # that LR (a round trip through log10 moved it an ulp, off the side of lr_star)
        low, high = (float(v) for v in np.percentile(stars, [2.5, 97.5]))
    edge, suggest = "", []
    finite = mean[np.isfinite(mean)]
    if len(finite) > 1 and np.ptp(finite) == 0:
        edge = "flat"
    elif len(lrs) > 1 and best in (0, len(lrs) - 1):
        ratio = lrs[1] / lrs[0] if best == 0 else lrs[-1] / lrs[-2]
        edge = "low" if best == 0 else "high"
        step = 1 / ratio if best == 0 else ratio
        suggest = [float(f"{lrs[best] * step ** i:.3g}") for i in (1, 2)]
    elif stopped & {float(lrs[i]) for i in (best - 1, best + 1) if 0 <= i < len(lrs)}:
        edge = "stopped"  # a neighbour stopped at a rung: lr_star is the grid LR, unrefined
    return Optimum(cell=cell, lr_best=float(lrs[best]), lr_star=lr_star, lr_star_low=low,
                   lr_star_high=high, peak=float(at_best.mean()),
                   peak_std=float(at_best.std(ddof=1)) if len(at_best) > 1 else None,
                   n_seeds=len(at_best), edge=edge, suggest=suggest, n_lrs=len(lrs),
                   diverged=diverged)


def cell_order(cell: Cell) -> tuple:
    """Cells by method, then rank as a number, then the rest (recipe values as numbers too)."""
    values = [v for field, value in cell.to_row().items()
              for v in (parse_recipe(value).values() if field == "recipe" else [value])]
    return tuple((0, float(v), "") if isinstance(v, int | float) else (1, 0.0, str(v))
                 for v in values)


Curves = dict[Cell, dict[int, dict[float, float]]]


def cell_curves(records: list[TrialRecord]) -> tuple[Curves, dict[Cell, int]]:
    """Per cell: {seed: {lr: metric}} with diverged trials as inf and pruned ones as NaN (on the
    grid, with no value), and the number of diverged trials."""
    curves: Curves = defaultdict(lambda: defaultdict(dict))
    diverged: dict[Cell, int] = defaultdict(int)
    for record in records:
        if record.status == "pruned":
            curves[record.cell][record.seed][record.lr] = math.nan
        if record.status == "diverged":  # part of the grid, but never an optimum
            diverged[record.cell] += 1
            curves[record.cell][record.seed][record.lr] = math.inf
        if (record.status == "complete" and record.metric is not None
                and math.isfinite(record.metric)):
            curves[record.cell][record.seed][record.lr] = record.metric
    return curves, diverged


def find_optima(records: list[TrialRecord], maximize: bool, seed: int = 0) -> list[Optimum]:
    """Optima of every cell with a complete trial."""
    curves, diverged = cell_curves(records)
    stopped: dict[Cell, set[float]] = defaultdict(set)
    for record in records:
        if record.status == "pruned":
            stopped[record.cell].add(record.lr)
    rng = np.random.default_rng(seed)
    return [cell_optimum(cell, curves[cell], diverged[cell], maximize, rng,
                         frozenset(stopped[cell]))
            for cell in sorted(curves, key=cell_order)
            if any(math.isfinite(v) for curve in curves[cell].values() for v in curve.values())]
