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
from lorasweep.variants import get_init, get_variant


def predicted_beta(method: str, alpha_mode: str | None, init: str | None) -> float | None:
    """The muA exponent of lr_star in rank, where the paper gives one: for a method with a muA
    family (variants.Variant.mua_family) and an Init[A] (B = 0, A at a rank-independent scale)
    or Init[B] init."""
    variant, kind = get_variant(method), getattr(get_init(init), "mua", None)
    if variant is None or variant.mua_family is None or alpha_mode is None or kind is None:
        return None
    assert variant.rank_power is not None
    # s = lora_alpha / r^p ~ r^-gamma: lora_alpha ~ r gives gamma = p - 1, a constant gamma = p
    gamma = variant.rank_power - (1.0 if alpha_mode == "per_rank" else 0.0)
    if kind == "B":
        return 0.0 if gamma == 0.0 else None
    return -(1 - gamma) / 2 + 0.0  # + 0.0 turns -0.0 into 0.0


def predicted_width_exponent(method: str, alpha_mode: str | None, init: str | None) -> float | None:
    """The muA exponent of lr_star in the input width n, for the cells the rank rule covers."""
    if predicted_beta(method, alpha_mode, init) is None:
        return None
    return -1.0 if getattr(get_init(init), "mua", None) == "B" else -0.5


def alpha_spec(cell: dict) -> str | None:
    """lora_alpha as the study file writes it: "16" (constant) or "2r" (per rank)."""
    alpha, rank = cell.get("lora_alpha"), cell.get("rank")
    if alpha in (None, "") or rank in (None, ""):
        return None
    if cell.get("alpha_mode") == "per_rank":
        return f"{float(alpha) / int(rank):g}r"
    return f"{float(alpha):g}"


def family_key(cell: dict) -> tuple:
    """What a rank fit holds fixed: everything of a cell but its rank (its recipe included)."""
    return (cell["method"], cell.get("alpha_mode"), alpha_spec(cell), cell.get("init"),
            cell.get("target_modules"), cell.get("recipe"))


@dataclass
class RankFit:
    key: tuple  # family_key of its cells
    method: str
    alpha_mode: str | None
    alpha: str | None
    init: str | None
    ranks: list[int]
    beta: float
    beta_low: float | None
    beta_high: float | None
    intercept: float  # of the first study that has the family
    predicted: float | None
    intercepts: dict[int, float]  # per study (its index in the fit's arguments)

    def as_row(self) -> dict:
        return {"method": self.method, "alpha_mode": self.alpha_mode, "lora_alpha": self.alpha,
                "init": self.init,
                "ranks": " ".join(map(str, self.ranks)), "beta": self.beta,
                "beta_low": self.beta_low, "beta_high": self.beta_high,
                "beta_muA": self.predicted}


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
    groups: dict[tuple, list[tuple[int, Optimum]]] = defaultdict(list)
    for index, optima in enumerate(studies):
        for optimum in optima:
            if optimum.cell.get("rank") not in (None, ""):
                groups[family_key(optimum.cell)].append((index, optimum))
    fits = []
    for key, members in sorted(groups.items(), key=lambda g: str(g[0])):
        ranks = sorted({int(o.cell["rank"]) for _, o in members})
        fit = pooled_slope(np.log10([int(o.cell["rank"]) for _, o in members]),
                           np.log10([o.lr_star for _, o in members]),
                           np.array([index for index, _ in members]))
        if fit is None:
            continue
        beta, stderr, dof, intercepts = fit
        low = high = None
        if math.isfinite(stderr):
            half = stats.t.ppf(0.975, dof) * stderr
            low, high = beta - half, beta + half
        method, mode, alpha, init, *_ = key
        fits.append(RankFit(key=key, method=method, alpha_mode=mode, alpha=alpha, init=init,
                            ranks=ranks, beta=beta, beta_low=low, beta_high=high,
                            intercept=intercepts[min(intercepts)],
                            predicted=predicted_beta(method, mode, init), intercepts=intercepts))
    return fits
