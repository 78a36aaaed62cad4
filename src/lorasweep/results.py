"""What a study folder shows a person: trials.csv (one row per trial) and metric-vs-LR.png."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lorasweep.space import TrialSpec
from lorasweep.study.store import Store

TRIALS_CSV = "trials.csv"
PLOT_PNG = "metric_vs_lr.png"
COLUMNS = ("trial", "method", "rank", "lora_alpha", "alpha_mode", "init", "target_modules",
           "lr", "seed", "status", "train_loss", "eval_loss", "metric", "test_metric", "steps",
           "seconds", "trainable_params", "effective_scale", "attempts", "reason")


def trial_rows(store: Store, metric_name: str) -> list[dict]:
    """One row per trial of the grid, from the attempt that decides its status."""
    rows = []
    for status, trial, attempts in store.latest_by_key().values():
        spec = TrialSpec.from_attrs(trial.user_attrs)
        attrs = trial.user_attrs
        cell = spec.cell
        rows.append({
            "trial": spec.grid_id, "method": cell.label, "rank": cell.rank,
            "lora_alpha": cell.alpha, "alpha_mode": cell.alpha_mode, "init": cell.init,
            "target_modules": cell.target_modules, "lr": spec.lr, "seed": spec.seed,
            "status": status, "train_loss": attrs.get("train_loss"),
            "eval_loss": attrs.get("val_eval_loss"), "metric": attrs.get(f"val_{metric_name}"),
            "test_metric": attrs.get(f"test_{metric_name}"), "steps": attrs.get("steps"),
            "seconds": attrs.get("seconds"), "trainable_params": attrs.get("trainable_params"),
            "effective_scale": attrs.get("effective_scale"), "attempts": attempts,
            "reason": attrs.get("reason"),
        })
    return sorted(rows, key=lambda r: r["trial"])


def write_outputs(folder: Path, store: Store, metric_name: str) -> list[dict]:
    rows = trial_rows(store, metric_name)
    tmp = folder / f".{TRIALS_CSV}.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    tmp.replace(folder / TRIALS_CSV)
    plot_metric_vs_lr(rows, metric_name, folder / PLOT_PNG)
    return rows


def cell_label(row: dict) -> str:
    if row["method"] == "full":
        return "full"
    alpha = row["lora_alpha"]
    return (f"{row['method']} r={row['rank']} alpha={alpha:g} {row['init']}"
            if alpha is not None else row["method"])


def plot_metric_vs_lr(rows: list[dict], metric_name: str, path: Path) -> None:
    """Validation metric against LR, one line per cell (mean over seeds); diverged runs as x."""
    by_cell: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    diverged: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        label = cell_label(row)
        if row["status"] == "complete" and _finite(row["metric"]):
            by_cell[label][row["lr"]].append(float(row["metric"]))
        elif row["status"] == "diverged":
            diverged[label].append(row["lr"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted(set(by_cell) | set(diverged)):
        points = sorted(by_cell[label].items())
        line = None
        if points:
            (line,) = ax.plot([lr for lr, _ in points],
                              [sum(v) / len(v) for _, v in points], marker="o", label=label)
        if diverged[label]:
            color = line.get_color() if line is not None else None
            ax.scatter(diverged[label], [0.02] * len(diverged[label]), marker="x", color=color,
                       transform=ax.get_xaxis_transform(), label=f"{label} (diverged)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {metric_name}")
    ax.grid(True, which="both", alpha=0.3)
    if by_cell or diverged:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)

