"""How the optimal LR scales with rank: fitted exponents beside the ones muA predicts.

log10 lr_star = a + beta log10 r, fitted by least squares per family (a cell without its rank:
method, lora_alpha as a constant or a per-rank factor, init, target modules), with a 95% interval
for beta from the t distribution. Several studies fit one beta together, each with its own
intercept (their LRs differ by model and task; the slope is what transfers).

The muA paper (effective alpha = lora_alpha / r in PEFT's terms, Adam) predicts, for inits with
B = 0 and random A, eta* ~ r^-((1 - gamma) / 2) when the effective alpha ~ r^-gamma: lora_alpha
proportional to r gives gamma = 0 (beta = -1/2), a constant lora_alpha gamma = 1 (beta = 0,
rank-invariant); rsLoRA divides by sqrt(r) instead, so gamma = -1/2 (beta = -3/4) and gamma = 1/2
(beta = -1/4). Init[B] (A = 0, B random) with lora_alpha = r is rank-invariant (beta = 0).
In the input width n, eta* ~ n^-1/2 for those Init[A] cells and n^-1 for Init[B].
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats

from lorasweep.analysis.optima import Optimum
from lorasweep.space import Cell
from lorasweep.variants import get_variant, mua_kind


def predicted_beta(cell: Cell) -> float | None:
    """The muA exponent of lr_star in rank, where the paper gives one: for a method with a muA
    family (variants.Variant.mua_family) and an Init[A] (B = 0, A at a rank-independent scale)
    or Init[B] init."""
    variant, kind, mode = get_variant(cell.method), mua_kind(cell.init), cell.alpha_mode
    if variant is None or variant.mua_family is None or mode is None or kind is None:
        return None
    assert variant.rank_power is not None
    # s = lora_alpha / r^p ~ r^-gamma: lora_alpha ~ r gives gamma = p - 1, a constant gamma = p
    gamma = variant.rank_power - (1.0 if mode == "per_rank" else 0.0)
    if kind == "B":
        return 0.0 if gamma == 0.0 else None
    return -(1 - gamma) / 2 + 0.0  # + 0.0 turns -0.0 into 0.0


def predicted_width_exponent(cell: Cell) -> float | None:
    """The muA exponent of lr_star in the input width n, for the cells the rank rule covers."""
    if predicted_beta(cell) is None:
        return None
    return -1.0 if mua_kind(cell.init) == "B" else -0.5


def family_order(family: Cell) -> str:
    """Families in a stable order: by label, alpha mode and lora_alpha, then the rest."""
    return str((family.label, family.alpha_mode, family.alpha_spec, family.init,
                family.target_modules, family.recipe))


@dataclass
class RankFit:
    family: Cell  # its cells without their rank
    ranks: list[int]
    beta: float
    beta_low: float | None
    beta_high: float | None
    intercept: float  # of the first study that has the family
    predicted: float | None
    intercepts: dict[int, float]  # per study (its index in the fit's arguments)

    @property
    def method(self) -> str:
        return self.family.label

    @property
    def alpha(self) -> str | None:
        return self.family.alpha_spec

    @property
    def init(self) -> str | None:
        return self.family.init


def pooled_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray
                 ) -> tuple[float, float, int, dict[int, float]] | None:
    """Least squares y = a_g + slope x with one intercept per group (the fixed-effects fit; one
    group is ordinary least squares, as scipy's linregress). Returns the slope, its standard error
    (NaN without residual degrees of freedom), those degrees of freedom and the intercepts; None
    when no group has two distinct x. Written out because scipy fits one intercept only."""
    xc, yc = x.astype(float), y.astype(float)
    means = {}
    for g in np.unique(groups):
        where = groups == g
        means[int(g)] = (x[where].mean(), y[where].mean())
        xc = np.where(where, x - means[int(g)][0], xc)
        yc = np.where(where, y - means[int(g)][1], yc)
    sxx = float((xc ** 2).sum())
    if sxx <= 1e-12:
        return None
    slope = float((xc * yc).sum() / sxx)
    dof = len(x) - len(means) - 1
    residual = float(((yc - slope * xc) ** 2).sum())
    stderr = math.sqrt(residual / dof / sxx) if dof > 0 else math.nan
    return slope, stderr, dof, {g: float(my - slope * mx) for g, (mx, my) in means.items()}


def fit_rank_scaling(*studies: list[Optimum]) -> list[RankFit]:
    """One fit per family with optima at two or more ranks (in one study, or over several)."""
    groups: dict[Cell, list[tuple[int, Optimum]]] = defaultdict(list)
    for index, optima in enumerate(studies):
        for optimum in optima:
            if optimum.cell.rank is not None:
                groups[optimum.cell.family].append((index, optimum))
    fits = []
    for family, members in sorted(groups.items(), key=lambda g: family_order(g[0])):
        ranks = sorted({o.cell.rank for _, o in members})
        fit = pooled_slope(np.log10([o.cell.rank for _, o in members]),
                           np.log10([o.lr_star for _, o in members]),
                           np.array([index for index, _ in members]))
        if fit is None:
            continue
        beta, stderr, dof, intercepts = fit
        low = high = None
        if math.isfinite(stderr):
            half = stats.t.ppf(0.975, dof) * stderr
            low, high = beta - half, beta + half
        fits.append(RankFit(family=family, ranks=ranks, beta=beta, beta_low=low, beta_high=high,
                            intercept=intercepts[min(intercepts)],
                            predicted=predicted_beta(family), intercepts=intercepts))
    return fits
