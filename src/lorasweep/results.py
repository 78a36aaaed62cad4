"""trials.csv: one row per trial of the grid, rewritten as trials finish."""

from __future__ import annotations

import csv
from pathlib import Path

from lorasweep.files import atomic_path
from lorasweep.space import TrialSpec
from lorasweep.study.store import Store

TRIALS_CSV = "trials.csv"
COLUMNS = ("trial", "method", "rank", "lora_alpha", "alpha_mode", "init", "target_modules",
           "recipe", "lr", "seed", "status", "train_loss", "eval_loss", "metric", "test_metric",
           "steps", "seconds", "trainable_params", "effective_scale", "attempts", "reason")


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
            "target_modules": cell.target_modules, "recipe": cell.recipe, "lr": spec.lr,
            "seed": spec.seed,
            "status": status, "train_loss": attrs.get("train_loss"),
            "eval_loss": attrs.get("val_eval_loss"), "metric": attrs.get(f"val_{metric_name}"),
            "test_metric": attrs.get(f"test_{metric_name}"), "steps": attrs.get("steps"),
            "seconds": attrs.get("seconds"), "trainable_params": attrs.get("trainable_params"),
            "effective_scale": attrs.get("effective_scale"), "attempts": attempts,
            "reason": attrs.get("reason"),
        })
    return sorted(rows, key=lambda r: r["trial"])


def write_trials_csv(folder: Path, store: Store, metric_name: str) -> list[dict]:
    rows = trial_rows(store, metric_name)
    with atomic_path(folder / TRIALS_CSV) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return rows
