"""The report's curvature section, from curvature.csv (`lorasweep curvature`) and the optima.

Shared by `lorasweep report` and `lorasweep curvature`: it reads analysis/curvature.py and renders
through report.tables, and imports neither command.

Absent curvature.csv, the section is absent: the rest of the report never depends on it.
"""

from __future__ import annotations

import statistics

from lorasweep.analysis.compare import cell_name
from lorasweep.analysis.curvature import (
    ANCHOR_METHOD,
    DEFAULT_P,
    cell_curvatures,
    predict_lrs,
)
from lorasweep.records import CurvatureRecord, Optimum
from lorasweep.report.numbers import fmt
from lorasweep.report.tables import Table
from lorasweep.space import Cell


def _stage_name(record: CurvatureRecord) -> str:
    name = ("init" if record.stage == "init" else
            f"after {record.steps} steps at lr {fmt(record.warmup_lr)}")
    return name + (", Adam-preconditioned" if record.preconditioned else "")


def eigenvalue_table(records: list[CurvatureRecord]) -> Table:
    """lambda_max per cell and stage: joint, median over modules, and per module type."""
    types = list(dict.fromkeys(r.module_type for r in records if r.block != "joint"))
    groups: dict[tuple[Cell, str], list[CurvatureRecord]] = {}
    for record in records:
        groups.setdefault((record.cell, _stage_name(record)), []).append(record)
    table_rows = []
    for (cell, stage), members in groups.items():
        joint = [r for r in members if r.block == "joint"]
        modules = [r for r in members if r.block != "joint"]

        def median(chosen: list[CurvatureRecord]) -> str:
            return fmt(statistics.median(r.lambda_max for r in chosen)) if chosen else "-"

        table_rows.append([
            cell_name(cell), stage,
            fmt(joint[0].lambda_max) if joint else "-",
            fmt(joint[0].lambda_min) if joint else "-",
            median(modules),
            *[median([r for r in modules if r.module_type == t]) for t in types],
            str(max(r.products for r in members)),
            f"{sum(r.converged for r in members)}/{len(members)}"])
    return Table(
        "Largest Hessian eigenvalue",
        "Lanczos on Hessian-vector products of the training loss (the trial's first batches, "
        "token-weighted) from the weights a trial starts with. joint: all trainable parameters "
        "(task head included); modules: each adapted module's own block ((A, B) together; a "
        "full fine-tuning module's weight and bias), median over modules, then per module type "
        "(median over layers). Adam-preconditioned: eigenvalues of P^-1/2 H P^-1/2, P = "
        "sqrt(v_hat) + eps from AdamW's second moment. products: the most any block needed; "
        "converged: blocks whose eigenvalues met the tolerance.",
        ["cell", "stage", "joint lambda_max", "joint lambda_min", "modules: median lambda_max",
         *types, "products", "converged"],
        table_rows)


def prediction_table(records: list[CurvatureRecord], optima: list[Optimum]) -> Table | None:
    """lambda against each cell's measured optimum, and the LR the curvature predicts."""
    curvatures, fit = predict_lrs(cell_curvatures(records), optima)
    if not curvatures or not any(c.lr_star is not None for c in curvatures):
        return None
    anchor = next((c for c in curvatures if c.cell.method == ANCHOR_METHOD), None)
    if fit is None:
        fitted = "p cannot be fitted (fewer than two cells with an optimum and a curvature)"
    else:
        interval = f", 95% interval {fit.low:.2f} - {fit.high:.2f}" if fit.low is not None else ""
        fitted = f"fitted p = {fit.p:.2f} over {fit.n} cells{interval}"
    note = (f"lr_star ~ lambda^-p, lambda: the median module block's lambda_max at init (the "
            f"joint one where no module was measured); {fitted}. predicted: lr_star(LoRA) x "
            f"(lambda(LoRA) / lambda)^p with p fitted on the other cells (leave one out), or "
            f"p = {DEFAULT_P:g} (gradient descent's stability bound) with fewer than two of them. "
            "error: log10(predicted / measured) in steps of the cell's LR grid.")
    return Table(
        "Curvature and the optimal learning rate", note,
        ["cell", "lambda", "lambda / LoRA's", "lr_star measured", "lr predicted", "p used",
         "error (grid steps)"],
        [[cell_name(c.cell), fmt(c.lam), fmt(c.lam / anchor.lam) if anchor else "-",
          fmt(c.lr_star), fmt(c.lr_predicted),
          f"{c.p_used:.2f}" if c.p_used is not None else "-",
          f"{c.error_steps:+.2f}" if c.error_steps is not None else "-"] for c in curvatures])


def curvature_tables(records: list[CurvatureRecord], optima: list[Optimum]) -> list[Table]:
    """The section's tables; none without curvature records."""
    if not records:
        return []
    prediction = prediction_table(records, optima)
    return [eigenvalue_table(records), *([prediction] if prediction else [])]
