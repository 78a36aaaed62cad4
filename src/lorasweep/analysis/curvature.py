"""From curvature to learning rate: lr_star ~ lambda_max^-p, fitted and used to predict.

Each cell's curvature is one number: the median over its adapted modules of the block lambda_max
at initialization (the per-module (A, B) blocks of "Learning Rate Matters"), or the joint
lambda_max when no module blocks were measured. The joint one is not the default because a
freshly drawn task head, the same for every method, dominates it.

The exponent p comes from least squares of log lr_star on log lambda over the cells with a
measured optimum. A cell's predicted LR is lr_star(LoRA) * (lambda(LoRA) / lambda(cell))^p with
p fitted *without that cell* (leave one out, so the prediction never saw the optimum it is
scored against); with fewer than two other cells to fit, p = 1, gradient descent's stability
bound lr < 2 / lambda_max (the paper's PiSSA: 12x LoRA's curvature, a 10x lower LR, p ~ 0.93).
The error is log10(predicted / measured) in grid steps of the cell's LR grid.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats

from lorasweep.records import CurvatureRecord, Optimum
from lorasweep.space import Cell

DEFAULT_P = 1.0
ANCHOR_METHOD = "lora"


@dataclass
class CellCurvature:
    cell: Cell
    lam: float
    source: str  # "modules" (median over module blocks) or "joint"
    grid_step: float | None
    lr_star: float | None = None
    lr_predicted: float | None = None
    p_used: float | None = None
    error_steps: float | None = None


@dataclass
class ExponentFit:
    p: float
    low: float | None
    high: float | None
    n: int


def cell_curvatures(records: list[CurvatureRecord]) -> list[CellCurvature]:
    """One curvature per cell from its records at init (not preconditioned), in file order."""
    found: dict[Cell, dict[str, list[float]]] = {}
    steps: dict[Cell, float | None] = {}
    for record in records:
        if record.stage != "init" or record.preconditioned:
            continue
        steps[record.cell] = record.lr_grid_step
        kind = "joint" if record.block == "joint" else "modules"
        found.setdefault(record.cell, {}).setdefault(kind, []).append(record.lambda_max)
    out = []
    for cell, kinds in found.items():
        source = "modules" if "modules" in kinds else "joint"
        out.append(CellCurvature(cell=cell, lam=statistics.median(kinds[source]),
                                 source=source, grid_step=steps[cell]))
    return out


def fit_exponent(points: list[tuple[float, float]]) -> ExponentFit | None:
    """p of lr_star ~ lambda^-p by least squares in log-log, with a 95% interval from three
    points on; None below two points or when every lambda is the same."""
    if len(points) < 2 or len({lam for lam, _ in points}) < 2:
        return None
    fit = stats.linregress(np.log10([lam for lam, _ in points]),
                           np.log10([lr for _, lr in points]))
    low = high = None
    if len(points) > 2 and math.isfinite(fit.stderr):
        half = stats.t.ppf(0.975, len(points) - 2) * fit.stderr
        low, high = -fit.slope - half, -fit.slope + half
    return ExponentFit(p=float(-fit.slope), low=low, high=high, n=len(points))


def predict_lrs(curvatures: list[CellCurvature], optima: list[Optimum]
                ) -> tuple[list[CellCurvature], ExponentFit | None]:
    """Fill each cell's measured and curvature-predicted LR; returns the cells and the fit of p
    over every cell with both numbers. Predictions need a LoRA cell with a measured optimum."""
    measured = {optimum.cell: optimum.lr_star for optimum in optima}
    for item in curvatures:
        item.lr_star = measured.get(item.cell)
    usable = [c for c in curvatures if c.lam > 0]
    known = [c for c in usable if c.lr_star is not None]
    fit = fit_exponent([(c.lam, c.lr_star) for c in known])
    anchors = [c for c in known if c.cell.method == ANCHOR_METHOD]
    if not anchors:
        return curvatures, fit
    anchor = anchors[0]
    for item in usable:
        if item is anchor:
            continue
        others = fit_exponent([(c.lam, c.lr_star) for c in known if c is not item])
        item.p_used = others.p if others is not None else DEFAULT_P
        item.lr_predicted = anchor.lr_star * (anchor.lam / item.lam) ** item.p_used
        if item.lr_star is not None and item.grid_step:
            item.error_steps = math.log10(item.lr_predicted / item.lr_star) / item.grid_step
    return curvatures, fit
