"""How a claimed group of trials trains: the one interface the worker loop (study/runner.py)
talks to, so the loop (claims, leases, records, failures) knows no engine.

Two trainers implement it: `fused.FusedTrainer` (lorasweep's own engine: K trials in one forward
and backward over a base loaded once) and `command.CommandTrainer` (each trial runs the study's
external training command). A new trainer is a class with these methods, chosen in
`study/runner.trainer_for`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lorasweep.records import TrialResult
from lorasweep.space import Cell, TrialSpec

# Called by a trainer for each trial as soon as it finishes, so a crash later in the group loses
# only the trials not yet recorded.
Record = Callable[[TrialSpec, TrialResult], None]
# Called by a trainer with the trials it starts training together; returns the hook it calls
# with (step, steps) as they train (study/progress.RunProgress.start: what a person watches).
Show = Callable[[list[TrialSpec]], Callable[[int, int], None]]


class Keeper(Protocol):
    """What a trainer may record in the store (study/store.Store), named here so that trainers
    import no store: the worker loop's folder, study/, imports the trainers."""

    def keep_targets(self, targets: dict[str, list[str]]) -> None: ...


@dataclass
class DryRun:
    """What `lorasweep run --dry-run` says about the trainer: how it trains (the end of the
    summary line), notes on how it measured, and one line per group it would train."""

    how: str
    groups: list[str]
    notes: list[str] = field(default_factory=list)


class Trainer(Protocol):
    """A study's trainer, made once per process (loading what every trial shares)."""

    # adapter width per target set, for search.match_params (None: the plan needs none)
    widths: dict[str, int] | None

    def check(self) -> None:
        """Refuse input that cannot train (StudyError), before the store is touched."""

    def keep_in(self, store: Keeper) -> None:
        """Record in the store what every worker of the study must agree on."""

    def claim_size(self) -> int:
        """How many trials of one group a worker claims at once."""

    def train(self, specs: list[TrialSpec], record: Record, show: Show, after: int = 0,
              checkpoints: dict | None = None) -> None:
        """Train one claimed group (one cell and seed), calling `show` with the trials it starts
        and `record` for each trial as it finishes; an exception fails the trials not yet
        recorded. search.stop_early: trials going on from a rung at step `after` resume from
        their `checkpoints` (by trial key; None: none left, train again from the start)."""

    def describe(self, trials: list[TrialSpec]) -> DryRun:
        """The dry run of `trials` (a fresh run's plan): how they would train; writes nothing."""


def describe_cell(cell: Cell) -> str:
    """A cell in a line of the dry run: its method, and an adapter's rank, scale and layers."""
    recipe = f" {cell.recipe}" if cell.recipe else ""
    if not cell.is_adapter:  # full fine-tuning: of every weight, or of the parts it names
        parts = "" if cell.target_modules is None else f" {cell.target_modules}"
        return f"{cell.label}{parts}{recipe}"
    return (f"{cell.label} r={cell.rank} lora_alpha={cell.alpha:g} {cell.init} "
            f"{cell.target_modules}{recipe}")
