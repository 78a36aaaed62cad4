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

from lorasweep.analysis.optima import CELL_FIELDS, Optimum

BOOTSTRAP_SAMPLES = 2000


def cell_name(cell: dict) -> str:
    """A short, readable name of a cell for tables and legends."""
    recipe = cell.get("recipe")
    recipe_text = f" {recipe.replace(';', ' ')}" if recipe not in (None, "") else ""
    if cell.get("rank") in (None, ""):
        return f"{cell['method']}{recipe_text}"
    alpha = cell.get("lora_alpha")
    alpha_text = ""
    if alpha not in (None, ""):
        per_rank = cell.get("alpha_mode") == "per_rank"
        alpha_text = (f" a={float(alpha) / int(cell['rank']):g}r" if per_rank
                      else f" a={float(alpha):g}")
    init = cell.get("init")
    init_text = f" {init}" if init not in (None, "", "kaiming", cell["method"]) else ""
    targets = cell.get("target_modules")
    target_text = f" {targets}" if targets not in (None, "", "all-linear") else ""
    return f"{cell['method']} r={cell['rank']}{alpha_text}{init_text}{target_text}{recipe_text}"


@dataclass
class Peak:
    name: str
    values: list[float]  # the metric at the cell's best grid LR, one per seed
    low: float | None
    high: float | None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))


def family_name(cell: dict) -> str:
    """A rank family's name: its cells' name without the rank."""
    return cell_name(cell).replace(f" r={cell['rank']}", "")


def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def tuned_peaks(rows: list[dict], optima: list[Optimum], seed: int = 0) -> list[Peak]:
    """Each cell's metric at its best LR, per seed, with a bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    peaks = []
    for optimum in optima:
        values = [float(r["metric"]) for r in rows
                  if r["status"] == "complete" and float(r["lr"]) == optimum.lr_best
                  and all(r.get(f) == optimum.cell[f] for f in CELL_FIELDS)]
        low = high = None
        if len(values) > 1:
            draws = rng.choice(values, (BOOTSTRAP_SAMPLES, len(values))).mean(axis=1)
            low, high = _interval(draws)
        peaks.append(Peak(cell_name(optimum.cell), values, low, high))
    return peaks


def pairwise(peaks: list[Peak], seed: int = 0) -> list[dict]:
    """Differences of peak means for every pair, with bootstrap intervals; each cell's seeds are
    resampled on their own (conservative: it ignores any noise two cells share through a seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(peaks):
        for b in peaks[i + 1:]:
            row = {"a": a.name, "b": b.name, "difference": a.mean - b.mean, "low": None,
                   "high": None}
            if len(a.values) > 1 and len(b.values) > 1:
                draws_a = rng.choice(a.values, (BOOTSTRAP_SAMPLES, len(a.values))).mean(axis=1)
                draws_b = rng.choice(b.values, (BOOTSTRAP_SAMPLES, len(b.values))).mean(axis=1)
                row["low"], row["high"] = _interval(draws_a - draws_b)
            out.append(row)
    return out


def fixed_lr_table(rows: list[dict], maximize: bool) -> tuple[list[str], list[dict]]:
    """Per LR: each cell's mean metric there and the winning cell. Returns (cell names, rows)."""
    by_lr: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    names: list[str] = []
    for row in rows:
        name = cell_name({f: row.get(f) for f in CELL_FIELDS})
        if name not in names:
            names.append(name)
        if row["status"] == "complete" and row.get("metric") is not None:
            by_lr[float(row["lr"])][name].append(float(row["metric"]))
        elif row["status"] == "diverged":
            by_lr[float(row["lr"])][name].append(math.nan)
    table = []
    for lr in sorted(by_lr):
        means = {name: float(np.mean(v)) for name, v in by_lr[lr].items()}
        finite = {n: m for n, m in means.items() if math.isfinite(m)}
        winner = ((max if maximize else min)(finite, key=finite.get)
                  if len(finite) > 1 else "")
        table.append({"lr": lr, "means": means, "winner": winner})
    return names, table
