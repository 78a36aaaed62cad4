"""What a study records and the files it writes: one reader and one writer per file.

A low layer: it knows the record shapes (TrialResult, TrialRecord, Optimum) and the CSV layouts
(trials.csv, optima.csv, curvature.csv), but no trainer, model or analysis, so the store, the
analysis, the report, `suggest` and `curvature` all read and write through it without importing
each other. A row's cell columns are space.Cell's `to_row`, read back by its `from_row`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lorasweep.errors import StudyError
from lorasweep.files import atomic_path
from lorasweep.space import CELL_FIELDS, Cell, TrialSpec

if TYPE_CHECKING:  # a trial's weights are tensors; readers of the files need no torch
    import torch
    from optuna.trial import FrozenTrial

T = TypeVar("T")

TRIALS_CSV = "trials.csv"
OPTIMA_CSV = "optima.csv"
CURVATURE_CSV = "curvature.csv"
CURVES_CSV = "curves.csv"

COLUMNS = ("trial", "method", "rank", "lora_alpha", "alpha_mode", "init", "target_modules",
           "recipe", "lr", "seed", "status", "train_loss", "eval_loss", "metric", "test_metric",
           "steps", "selected_step", "seconds", "trainable_params", "effective_scale", "attempts",
           "worker", "reason")
OPTIMA_COLUMNS = (*CELL_FIELDS, "lr_best", "lr_star", "lr_star_low", "lr_star_high", "peak",
                  "peak_std", "n_seeds", "edge", "suggest", "n_lrs", "diverged")
CURVATURE_COLUMNS = (*CELL_FIELDS, "seed", "stage", "steps", "warmup_lr", "preconditioned",
                     "block", "module_type", "params", "lambda_max", "lambda_top", "lambda_min",
                     "products", "converged", "error", "items", "lr_grid_step")


@dataclass
class Checkpoint:
    """One trial paused at a rung of search.stop_early: what it resumes from (tensors on the
    CPU; train.py makes and reads it, study/folder.py keeps it in the study folder)."""

    step: int
    params: list[torch.Tensor]
    optimizer: list[dict | None]  # each parameter's AdamW state (None: none yet)
    course: dict = field(default_factory=dict)  # train.TrialCourse's record so far

    def as_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "optimizer": self.optimizer,
                "course": self.course}


@dataclass
class TrialResult:
    """What one trial produced. `metrics` are on the validation split; `test` never chooses."""

    status: str  # "complete", "diverged", or "paused" at a rung of search.stop_early
    steps: int
    seconds: float
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    loss_curve: list[float] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)  # the task's per-step curves
    eval_curve: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    effective_scale: float | None = None
    reason: str | None = None
    selected_step: int | None = None  # the evaluation `metrics` come from (None: diverged)
    weights: dict[str, torch.Tensor] | None = None  # trained adapter and head, for export
    # search.stop_early: the evaluation at each rung reached ({"step", "probe_steps", metrics})
    rungs: list[dict] = field(default_factory=list)
    checkpoint: Checkpoint | None = None  # a paused trial's, to resume from


@dataclass(frozen=True)
class TrialRecord:
    """What the analysis reads of one trial (a row of trials.csv, typed)."""

    trial: int | None  # its number in the study (None in a table made by hand)
    cell: Cell  # as recorded (Cell.recorded)
    lr: float
    seed: int
    status: str  # "complete", "diverged", "pruned", "failed", "paused", "running", "waiting"
    metric: float | None  # on the validation split; None until complete
    trainable_params: int | None = None
    steps: int | None = None  # the steps it trained (a pruned trial: the rung where it stopped)
    probe_steps: int | None = None  # search.stop_early: the steps of its rungs' decay probes

    @classmethod
    def from_row(cls, row: dict) -> TrialRecord:
        """From a trials.csv row, as written (text) or as trial_rows makes it (typed)."""
        def number(name: str, kind: type) -> Any:
            value = row.get(name)
            return None if value is None or value == "" else kind(float(value))
        return cls(trial=number("trial", int), cell=Cell.from_row(row),
                   lr=float(row["lr"]), seed=int(float(row["seed"])),
                   status=_required(row, "status"), metric=number("metric", float),
                   trainable_params=number("trainable_params", int),
                   steps=number("steps", int), probe_steps=number("probe_steps", int))


@dataclass
class Optimum:
    """One cell's optimum; lr_star_low/high are None where one seed gives no interval."""

    cell: Cell
    lr_best: float
    lr_star: float
    lr_star_low: float | None
    lr_star_high: float | None
    peak: float
    peak_std: float | None
    n_seeds: int
    # "low"/"high": the best LR is the grid's smallest/largest; "flat": no LR is better;
    # "stopped": a grid neighbour of the best stopped at a rung (search.stop_early), so the
    # best is not refined
    edge: str
    suggest: list[float]  # LRs to add when the optimum sits at an edge
    n_lrs: int
    diverged: int

    def as_row(self) -> dict:
        return {**self.cell.to_row(), "lr_best": self.lr_best, "lr_star": self.lr_star,
                "lr_star_low": self.lr_star_low, "lr_star_high": self.lr_star_high,
                "peak": self.peak, "peak_std": self.peak_std, "n_seeds": self.n_seeds,
                "edge": self.edge, "suggest": " ".join(f"{lr:.3g}" for lr in self.suggest),
                "n_lrs": self.n_lrs, "diverged": self.diverged}


def _required(row: dict, name: str) -> str:
    """A column every row has (a blank or missing one: a file cut short, or not lorasweep's)."""
    value = row.get(name)
    if value is None or value == "":
        raise ValueError(f"a row has no {name}")
    return str(value)


def _write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: list[dict]) -> None:
    """Replace `path` atomically; None is written as a blank."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns}
                         for row in rows)


class TrialSource(Protocol):
    """What trials.csv is made from (study.store.Store), named here so records import no store."""

    def latest_by_key(self) -> dict[str, tuple[str, FrozenTrial, int]]: ...


# trials.csv: one row per trial of the grid, rewritten as trials finish.

def trial_rows(store: TrialSource, metric_name: str) -> list[dict]:
    """One row per trial of the grid, from the attempt that decides its status."""
    return sorted((trial_row(status, trial, metric_name, attempts)
                   for status, trial, attempts in store.latest_by_key().values()),
                  key=lambda r: r["trial"])


def trial_row(status: str, trial: FrozenTrial, metric_name: str,
              attempts: int | None = None) -> dict:
    """One trial's row of trials.csv, from the attempt that decides its status (also what a
    tracker logs of it: the same numbers)."""
    spec = TrialSpec.from_attrs(trial.user_attrs)
    attrs = trial.user_attrs
    return {
        "trial": spec.grid_id, **spec.cell.to_row(), "lr": spec.lr, "seed": spec.seed,
        "status": status, "train_loss": attrs.get("train_loss"),
        "eval_loss": attrs.get("val_eval_loss"), "metric": attrs.get(f"val_{metric_name}"),
        "test_metric": attrs.get(f"test_{metric_name}"), "steps": attrs.get("steps"),
        "selected_step": attrs.get("selected_step"),
        "seconds": attrs.get("seconds"), "trainable_params": attrs.get("trainable_params"),
        "effective_scale": attrs.get("effective_scale"), "attempts": attempts,
        "worker": attrs.get("worker"), "reason": attrs.get("reason"),
        **_other_metrics(attrs, metric_name), **_rung_columns(attrs, metric_name),
    }


def _rung_columns(attrs: dict, metric_name: str) -> dict:
    """search.stop_early's columns, after COLUMNS, for a trial evaluated at rungs: the steps of
    its decay probes, and its metric at the last rung it reached (where a pruned trial
    stopped)."""
    rungs = attrs.get("rungs")
    if not rungs:
        return {}
    return {"probe_steps": sum(int(r["probe_steps"]) for r in rungs),
            "rung_metric": rungs[-1].get(metric_name)}


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


def trial_records(store: TrialSource, metric_name: str) -> list[TrialRecord]:
    """The grid's trials as the analysis reads them, straight from the store."""
    return [TrialRecord.from_row(row) for row in trial_rows(store, metric_name)]


def write_trials_csv(folder: Path, store: TrialSource, metric_name: str) -> list[TrialRecord]:
    rows = trial_rows(store, metric_name)
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    _write_csv(folder / TRIALS_CSV, [*COLUMNS, *extra], rows)
    return [TrialRecord.from_row(row) for row in rows]


# rungs.csv: search.stop_early's evaluations, one row per (trial, rung): the step, the length of
# the decay probe, and the validation metrics after it (with `raw_` before the name: the same
# metrics before the probe, recorded by a grid that stops nothing, for the replay benchmark).
RUNGS_CSV = "rungs.csv"
RUNGS_COLUMNS = ("trial", "rung", "step", "probe_steps")
Rungs = dict[int, list[dict]]  # trial -> its rung evaluations, in order


def write_rungs_csv(folder: Path, store: TrialSource) -> Rungs:
    """Every trial's rung evaluations from the attempt that decides it (a stale file goes)."""
    rungs: Rungs = {}
    for _, trial, _ in store.latest_by_key().values():
        if trial.user_attrs.get("rungs"):
            rungs[TrialSpec.from_attrs(trial.user_attrs).grid_id] = trial.user_attrs["rungs"]
    if not rungs:
        (folder / RUNGS_CSV).unlink(missing_ok=True)
        return rungs
    metrics = sorted({name for entries in rungs.values() for entry in entries
                      for name in entry} - {"step", "probe_steps"})
    _write_csv(folder / RUNGS_CSV, [*RUNGS_COLUMNS, *metrics],
               [{"trial": trial, "rung": index, **entry}
                for trial, entries in sorted(rungs.items())
                for index, entry in enumerate(entries)])
    return rungs


def read_rungs_csv(folder: Path) -> Rungs:
    """rungs.csv's evaluations (none when the study has no rungs)."""
    path = folder / RUNGS_CSV
    if not path.is_file():
        return {}
    rungs: Rungs = {}
    for trial, rung, entry in _read_rows(path, str(path), _rung_row, RUNGS_COLUMNS):
        entries = rungs.setdefault(trial, [])
        if rung != len(entries):
            raise StudyError(f"{path}: not as lorasweep writes it (trial {trial}'s rungs jump "
                             f"to {rung})")
        entries.append(entry)
    return rungs


def _rung_row(row: dict) -> tuple[int, int, dict]:
    entry = {"step": int(row["step"]), "probe_steps": int(row["probe_steps"])}
    entry.update({name: float(value) for name, value in row.items()
                  if name not in RUNGS_COLUMNS and value not in (None, "")})
    return int(row["trial"]), int(row["rung"]), entry


# curves.csv: the per-step curves a task records beside the loss (RL: each trial's mean reward),
# one row per (trial, curve, step); written only by a study whose task records any.
CURVES_COLUMNS = ("trial", "curve", "step", "value")
Curves = dict[int, dict[str, list[float]]]  # trial -> curve name -> value at steps 1, 2, ...


def write_curves_csv(folder: Path, store: TrialSource) -> Curves:
    """Every trial's curves from the attempt that decides it (a stale file goes)."""
    curves: Curves = {}
    for _, trial, _ in store.latest_by_key().values():
        recorded = trial.user_attrs.get("curves") or {}
        if recorded:
            curves[TrialSpec.from_attrs(trial.user_attrs).grid_id] = recorded
    if not curves:
        (folder / CURVES_CSV).unlink(missing_ok=True)
        return curves
    _write_csv(folder / CURVES_CSV, CURVES_COLUMNS,
               [{"trial": trial, "curve": name, "step": step, "value": value}
                for trial, named in sorted(curves.items()) for name, values in named.items()
                for step, value in enumerate(values, 1)])
    return curves


def read_curves_csv(folder: Path) -> Curves:
    """curves.csv's curves (none when the study's task records none)."""
    path = folder / CURVES_CSV
    if not path.is_file():
        return {}
    curves: Curves = {}
    for trial, name, step, value in _read_rows(path, str(path), _curve_point, CURVES_COLUMNS):
        values = curves.setdefault(trial, {}).setdefault(name, [])
        if step != len(values) + 1:
            raise StudyError(f"{path}: not as lorasweep writes it (trial {trial}'s {name} "
                             f"jumps to step {step})")
        values.append(value)
    return curves


def _curve_point(row: dict) -> tuple[int, str, int, float]:
    return int(row["trial"]), _required(row, "curve"), int(row["step"]), float(row["value"])


def read_trials_csv(folder: Path) -> list[TrialRecord]:
    """trials.csv's trials; a one-line error naming the file where it is not as written."""
    path = folder / TRIALS_CSV
    return _read_rows(path, str(path), TrialRecord.from_row)


def _read_rows(path: Path, where: str, parse: Callable[[dict], T],
               required: tuple[str, ...] = (), kind: str = "") -> list[T]:
    """Every row of a CSV lorasweep wrote, parsed; a one-line error naming `where` for a
    missing column or a row lorasweep would not write (short, blank, text for a number)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise StudyError(f"{where}: not an {kind or path.name} (no column {missing[0]})")
        try:
            return [parse(row) for row in reader]
        except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError) as exc:
            raise StudyError(f"{where}: not as lorasweep writes it "
                             f"({type(exc).__name__}: {exc})") from None


# optima.csv: one row per cell, written by the report.

def write_optima_csv(folder: Path, optima: list[Optimum]) -> None:
    _write_csv(folder / OPTIMA_CSV, OPTIMA_COLUMNS, [o.as_row() for o in optima])


def read_optima_csv(path: Path, where: str | None = None) -> list[Optimum]:
    """The optima as the report found them; a one-line error naming `where` (default: the path)
    for a missing file, a missing column or a value lorasweep would not write."""
    where = where or str(path)
    if not path.is_file():
        raise StudyError(f"{where}: no such file")
    # `recipe` came later: an older optima.csv has none, and its cells have no recipe
    return _read_rows(path, where, _optimum,
                      required=tuple(c for c in OPTIMA_COLUMNS if c != "recipe"), kind=OPTIMA_CSV)


def _optimum(row: dict) -> Optimum:
    return Optimum(cell=Cell.from_row(row), lr_best=float(row["lr_best"]),
                   lr_star=float(row["lr_star"]), lr_star_low=_number(row["lr_star_low"]),
                   lr_star_high=_number(row["lr_star_high"]), peak=float(row["peak"]),
                   peak_std=_number(row["peak_std"]), n_seeds=int(row["n_seeds"]),
                   edge=row["edge"], suggest=[float(v) for v in row["suggest"].split()],
                   n_lrs=int(row["n_lrs"]), diverged=int(row["diverged"]))


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


# curvature.csv: one row per measured block, written by `lorasweep curvature`.

@dataclass(frozen=True)
class CurvatureRecord:
    """One block of one cell measured at one stage (a row of curvature.csv, typed)."""

    cell: Cell  # as recorded (Cell.recorded)
    seed: int
    stage: str  # "init", or "warmup" after `steps` steps at `warmup_lr`
    steps: int
    warmup_lr: float | None
    preconditioned: bool  # Adam's P^-1/2 H P^-1/2 rather than H
    block: str  # an adapted module's name, or "joint" (every trainable parameter)
    module_type: str  # the module's last name part ("" for the joint block)
    params: int
    lambda_max: float
    lambda_top: str  # the largest eigenvalues, space-separated
    lambda_min: float
    products: int  # Hessian-vector products Lanczos used
    converged: bool
    error: float | None  # Lanczos' residual bound, relative to the spectral radius
    items: int | None  # what the loss averages over (examples, or scored tokens)
    lr_grid_step: float | None  # the cell's LR grid step, for errors in grid steps

    def to_row(self) -> dict:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__
                  if name != "cell"}
        return {**self.cell.to_row(), **fields}

    @classmethod
    def from_row(cls, row: dict) -> CurvatureRecord:
        """From a curvature.csv row as written (text) or as measured (typed)."""
        def value(name: str, kind: type, optional: bool = False) -> Any:
            if optional and row.get(name) in (None, ""):
                return None
            text = _required(row, name)
            if kind is bool:
                return text == "True"
            return kind(float(text)) if kind is int else kind(text)
        return cls(cell=Cell.from_row(row), seed=value("seed", int), stage=value("stage", str),
                   steps=value("steps", int), warmup_lr=value("warmup_lr", float, True),
                   preconditioned=value("preconditioned", bool), block=value("block", str),
                   module_type=row.get("module_type") or "", params=value("params", int),
                   lambda_max=value("lambda_max", float), lambda_top=value("lambda_top", str),
                   lambda_min=value("lambda_min", float), products=value("products", int),
                   converged=value("converged", bool), error=value("error", float, True),
                   items=value("items", int, True),
                   lr_grid_step=value("lr_grid_step", float, True))


def write_curvature_csv(folder: Path, records: list[CurvatureRecord]) -> None:
    _write_csv(folder / CURVATURE_CSV, CURVATURE_COLUMNS, [r.to_row() for r in records])


def read_curvature_csv(folder: Path) -> list[CurvatureRecord]:
    """curvature.csv's records (none where the folder has none); a one-line error naming the
    file where it is not as written."""
    path = folder / CURVATURE_CSV
    if not path.exists():
        return []
    return _read_rows(path, str(path), CurvatureRecord.from_row)
