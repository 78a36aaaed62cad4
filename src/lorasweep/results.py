"""trials.csv: one row per trial of the grid, rewritten as trials finish."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from lorasweep.files import atomic_path
from lorasweep.space import TrialSpec

if TYPE_CHECKING:  # the store pulls in torch and PEFT, which readers of trials.csv do not need
    from lorasweep.study.store import Store

TRIALS_CSV = "trials.csv"
COLUMNS = ("trial", "method", "rank", "lora_alpha", "alpha_mode", "init", "target_modules",
           "recipe", "lr", "seed", "status", "train_loss", "eval_loss", "metric", "test_metric",
           "steps", "selected_step", "seconds", "trainable_params", "effective_scale", "attempts",
           "worker", "reason")


def trial_rows(store: Store, metric_name: str) -> list[dict]:
    """One row per trial of the grid, from the attempt that decides its status."""
    rows = []
    for status, trial, attempts in store.latest_by_key().values():
        spec = TrialSpec.from_attrs(trial.user_attrs)
        attrs = trial.user_attrs
        cell = spec.cell
        rows.append({
            "trial": spec.grid_id, **cell.columns(), "lr": spec.lr, "seed": spec.seed,
            "status": status, "train_loss": attrs.get("train_loss"),
            "eval_loss": attrs.get("val_eval_loss"), "metric": attrs.get(f"val_{metric_name}"),
            "test_metric": attrs.get(f"test_{metric_name}"), "steps": attrs.get("steps"),
            "selected_step": attrs.get("selected_step"),
            "seconds": attrs.get("seconds"), "trainable_params": attrs.get("trainable_params"),
            "effective_scale": attrs.get("effective_scale"), "attempts": attempts,
            "worker": attrs.get("worker"), "reason": attrs.get("reason"),
            **_other_metrics(attrs, metric_name),
        })
    return sorted(rows, key=lambda r: r["trial"])


def _other_metrics(attrs: dict, metric_name: str) -> dict:
    """The task's metrics beside the one that chooses (e.g. accuracy_strict, pass@10), as
    columns after COLUMNS: validation under their own name, test with a `test_` prefix."""
    out = {}
    for prefix, column in (("val_", ""), ("test_", "test_")):
        for key, value in attrs.items():
            name = key[len(prefix):]
            shown = (metric_name, "eval_loss") if prefix == "val_" else (metric_name,)
            if key.startswith(prefix) and name not in shown:  # already in COLUMNS
                out[column + name] = value
    return out


def write_trials_csv(folder: Path, store: Store, metric_name: str) -> list[dict]:
    rows = trial_rows(store, metric_name)
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    with atomic_path(folder / TRIALS_CSV) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *extra])
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return rows


def read_trials_csv(folder: Path) -> list[dict]:
    """trials.csv's rows typed as trial_rows makes them (numbers as numbers, blanks as None)."""
    numbers = {**dict.fromkeys(("trial", "rank", "seed", "steps", "selected_step",
                                "trainable_params", "attempts"), int),
               **dict.fromkeys(("lora_alpha", "lr", "train_loss", "eval_loss", "metric",
                                "test_metric", "seconds", "effective_scale"), float)}
    with open(folder / TRIALS_CSV, newline="") as handle:  # columns beyond COLUMNS: metrics
        return [{k: None if v in (None, "") else numbers.get(k, str if k in COLUMNS else float)(v)
                 for k, v in row.items()} for row in csv.DictReader(handle)]
