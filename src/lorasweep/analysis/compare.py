"""Methods compared at their own tuned LR, and the fixed-LR view that flips winners.

At tuned LR each cell contributes its peak (the metric at its best grid LR) per seed; a 95%
interval of a peak, and of the difference of two peaks, comes from a bootstrap over seeds. At a
fixed LR each cell contributes its mean metric there, so the table shows which cell wins at which
LR: the comparison a single shared LR would have made.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lorasweep.analysis.optima import Optimum
from lorasweep.records import TrialRecord
from lorasweep.space import Cell

BOOTSTRAP_SAMPLES = 2000


def cell_name(cell: Cell, with_rank: bool = True) -> str:
    """A short, readable name of a cell for tables and legends (without its rank: its family's
    name)."""
    recipe = f" {cell.recipe.replace(';', ' ')}" if cell.recipe else ""
    targets = (f" {cell.target_modules}" if cell.target_modules not in (None, "all-linear")
               else "")
    if not cell.is_adapter or (cell.rank is None and with_rank):
        return f"{cell.label}{targets}{recipe}"
    rank = f" r={cell.rank}" if with_rank else ""
    alpha = f" a={cell.alpha_spec}" if cell.alpha_spec else ""
    init = f" {cell.init}" if cell.init not in (None, "kaiming", cell.label) else ""
    return f"{cell.label}{rank}{alpha}{init}{targets}{recipe}"


@dataclass
class Peak:
    name: str
    values: list[float]  # the metric at the cell's best grid LR, one per seed
    low: float | None
    high: float | None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))


def family_name(cell: Cell) -> str:
    """A rank family's name: its cells' name without the rank."""
    return cell_name(cell, with_rank=False)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def tuned_peaks(records: list[TrialRecord], optima: list[Optimum], seed: int = 0) -> list[Peak]:
    """Each cell's metric at its best LR, per seed, with a bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    peaks = []
    for optimum in optima:
        values = [r.metric for r in records
                  if r.status == "complete" and r.metric is not None and r.lr == optimum.lr_best
                  and r.cell == optimum.cell]
        low = high = None
        if len(values) > 1:
            draws = rng.choice(values, (BOOTSTRAP_SAMPLES, len(values))).mean(axis=1)
            low, high = _interval(draws)
        peaks.append(Peak(cell_name(optimum.cell), values, low, high))
    return peaks


@dataclass(frozen=True)
class Difference:
    """Peak a minus peak b (their indices in the peaks compared), with a 95% interval where both
    have two seeds or more."""

    i: int
    j: int
    a: str
    b: str
    difference: float
    low: float | None
    high: float | None

    def flipped(self) -> Difference:
        """b minus a, from the same bootstrap draws."""
        def negated(value: float | None) -> float | None:
            return None if value is None else 0.0 - value  # 0.0 - 0.0 is 0.0, not -0.0
        return Difference(self.j, self.i, self.b, self.a, 0.0 - self.difference,
                          negated(self.high), negated(self.low))


def pairwise(peaks: list[Peak], seed: int = 0) -> list[Difference]:
    """Differences of peak means for every pair, with bootstrap intervals; each cell's seeds are
    resampled on their own (conservative: it ignores any noise two cells share through a seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(peaks):
        for j in range(i + 1, len(peaks)):
            b = peaks[j]
            low = high = None
            if len(a.values) > 1 and len(b.values) > 1:
                draws_a = rng.choice(a.values, (BOOTSTRAP_SAMPLES, len(a.values))).mean(axis=1)
                draws_b = rng.choice(b.values, (BOOTSTRAP_SAMPLES, len(b.values))).mean(axis=1)
                low, high = _interval(draws_a - draws_b)
            out.append(Difference(i, j, a.name, b.name, a.mean - b.mean, low, high))
    return out


def versus(differences: list[Difference], k: int) -> list[Difference]:
    """Every other peak minus peak `k`, from the pairwise differences."""
    return [d if d.j == k else d.flipped() for d in differences if k in (d.i, d.j)]


def fixed_lr_table(records: list[TrialRecord], maximize: bool) -> tuple[list[str], list[dict]]:
    """Per LR: each cell's mean metric there and the winning cell. Returns (cell names, rows)."""
    by_lr: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    names: list[str] = []
    for record in records:
        name = cell_name(record.cell)
        if name not in names:
            names.append(name)
        if record.status == "complete" and record.metric is not None:
            by_lr[record.lr][name].append(record.metric)
        elif record.status == "diverged":
            by_lr[record.lr][name].append(math.nan)
    table = []
    for lr in sorted(by_lr):
        means = {name: float(np.mean(v)) for name, v in by_lr[lr].items()}
        finite = {n: m for n, m in means.items() if math.isfinite(m)}
        winner = ((max if maximize else min)(finite, key=finite.get)
                  if len(finite) > 1 else "")
        table.append({"lr": lr, "means": means, "winner": winner})
    return names, table
