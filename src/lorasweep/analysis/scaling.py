"""How the optimal LR scales with rank: fitted exponents beside the ones muA predicts.

log10 lr_star = a + beta log10 r, fitted by least squares per (method, alpha mode, init), with a
95% interval for beta from the t distribution (at least three ranks for an interval).

The muA paper (effective alpha = lora_alpha / r in PEFT's terms, Adam) predicts, for inits with
B = 0 and random A, eta* ~ r^-((1 - gamma) / 2) when the effective alpha ~ r^-gamma: lora_alpha
proportional to r gives gamma = 0 (beta = -1/2), a constant lora_alpha gamma = 1 (beta = 0,
rank-invariant); rsLoRA divides by sqrt(r) instead, so gamma = -1/2 (beta = -3/4) and gamma = 1/2
(beta = -1/4). Init[B] (A = 0, B random) with lora_alpha = r is rank-invariant (beta = 0).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats

from lorasweep.analysis.optima import Optimum

# Inits with B = 0 and A drawn at a rank-independent scale (gaussian's N(0, 1/r^2) is not).
A_INITS = ("kaiming", "mua_a")


def predicted_beta(method: str, alpha_mode: str | None, init: str | None) -> float | None:
    """The muA exponent of lr_star in rank, where the paper gives one."""
    if method not in ("lora", "rslora", "loraplus") or alpha_mode is None:
        return None
    if init == "mua_b":
        return 0.0 if alpha_mode == "per_rank" and method != "rslora" else None
    if init not in A_INITS:
        return None
    # effective alpha ~ r^-gamma
    gamma = {("per_rank", False): 0.0, ("constant", False): 1.0,
             ("per_rank", True): -0.5, ("constant", True): 0.5}[(alpha_mode, method == "rslora")]
    return -(1 - gamma) / 2 + 0.0  # + 0.0 turns -0.0 into 0.0


@dataclass
class RankFit:
    method: str
    alpha_mode: str | None
    init: str | None
    ranks: list[int]
    beta: float
    beta_low: float | None
    beta_high: float | None
    intercept: float
    predicted: float | None
    others: tuple = ()  # (target_modules, recipe): a fit never mixes cells that differ in these

    def as_row(self) -> dict:
        return {"method": self.method, "alpha_mode": self.alpha_mode, "init": self.init,
                "ranks": " ".join(map(str, self.ranks)), "beta": self.beta,
                "beta_low": self.beta_low, "beta_high": self.beta_high,
                "beta_muA": self.predicted}


def fit_rank_scaling(optima: list[Optimum]) -> list[RankFit]:
    """One fit per (method, alpha mode, init, target modules, recipe) with optima at two or
    more ranks."""
    groups: dict[tuple, list[Optimum]] = defaultdict(list)
    for optimum in optima:
        cell = optimum.cell
        if cell.get("rank") not in (None, ""):
            groups[(cell["method"], cell.get("alpha_mode"), cell.get("init"),
                    (cell.get("target_modules"), cell.get("recipe")))].append(optimum)
    fits = []
    for (method, mode, init, others), members in sorted(groups.items(), key=lambda g: str(g[0])):
        ranks = sorted({int(o.cell["rank"]) for o in members})
        if len(ranks) < 2:
            continue
        x = np.log10([int(o.cell["rank"]) for o in members])
        y = np.log10([o.lr_star for o in members])
        fit = stats.linregress(x, y)
        low = high = None
        if len(members) > 2 and math.isfinite(fit.stderr):
            half = stats.t.ppf(0.975, len(members) - 2) * fit.stderr
            low, high = fit.slope - half, fit.slope + half
        fits.append(RankFit(method=method, alpha_mode=mode, init=init, ranks=ranks,
                            beta=float(fit.slope), beta_low=low, beta_high=high,
                            intercept=float(fit.intercept),
                            predicted=predicted_beta(method, mode, init), others=others))
    return fits
