"""lorasweep's own engine as a trainer: the study's base model and data loaded once per process
(workbench.py), K trials of a group in one forward and backward (train.py), as many at a time as
fit the memory (trainers/memory.py), a group split in halves when it runs out of memory."""

from __future__ import annotations

from collections.abc import Callable

from lorasweep.config import Study
from lorasweep.errors import StudyError
from lorasweep.kinds import kind_of
from lorasweep.optim import probe_steps, rung_steps, total_steps
from lorasweep.recipe import Training, resolve_training
from lorasweep.records import TrialResult
from lorasweep.space import TrialSpec, recipes_of
from lorasweep.tasks import Task
from lorasweep.train import BestOf, Checkpoint, Rungs, train_group
from lorasweep.trainers import DryRun, Keeper, Record, Show, describe_cell
from lorasweep.trainers.memory import (
    GroupSizes,
    format_bytes,
    free_memory,
    how_measured,
    one_step,
    probe_peaks,
    train_fitting,
    without_evaluation,
)
from lorasweep.workbench import Workbench

TrainGroup = Callable[..., list[TrialResult]]  # train.train_group's signature


class FusedTrainer:
    """Trains a claimed group K trials at a time over one base copy.

    `train` is the engine's group step (train.train_group); the runner passes its own name for
    it, so a test can stand in a device that runs out of memory.
    """

    def __init__(self, study: Study, bench: Workbench, sizes: GroupSizes,
                 train: TrainGroup = train_group) -> None:
        self.study, self.bench, self.sizes = study, bench, sizes
        self.widths = bench.widths
        self._train_group = train

    def check(self) -> None:
        check_memory(self.study, self.bench, self.sizes)
        for text in recipes_of(self.study):
            self._rungs(resolve_training(self.study.train, text))

    def _rungs(self, training: Training, after: int = 0) -> Rungs | None:
        """search.stop_early at this training's length (None without it); a trial that goes
        on from step `after` pauses at the next rung."""
        stop_early = self.study.search.stop_early
        if stop_early is None:
            return None
        length = total_steps(training.train, len(self.bench.task_for(training).train))
        try:
            steps = rung_steps(stop_early.rungs, training.train, length)
        except ValueError as exc:
            raise StudyError(f"search.stop_early.rungs: {exc}") from None
        return Rungs(steps=tuple(steps),
                     probes=tuple(probe_steps(stop_early.cooldown, s) for s in steps),
                     pause=stop_early.stop, raw=not stop_early.stop, after=after)

    def keep_in(self, store: Keeper) -> None:
        store.keep_targets(self.bench.targets)

    def claim_size(self) -> int:
        return self.sizes.claim

    def train(self, specs: list[TrialSpec], record: Record, show: Show, after: int = 0,
              checkpoints: dict[str, Checkpoint] | None = None) -> None:
        training = resolve_training(self.study.train, specs[0].cell.recipe)
        task = self.bench.task_for(training)
        cell, sizes = specs[0].cell, self.sizes
        fusable = self.bench.fusable(cell)
        k = 1 if len(specs) == 1 else sizes.size(cell.key, fusable, lambda: probe_peaks(
            self._group_step(task, training, probe=True), specs[0], fusable, sizes.device))
        step = self._group_step(task, training, best_of=_best_of(self.study), show=show,
                                rungs=self._rungs(training, after), checkpoints=checkpoints)
        for group, results in train_fitting(step, specs, k, lambda n: sizes.shrink(cell.key, n)):
            for spec, result in zip(group, results, strict=True):
                record(spec, result)

    def _group_step(self, task: Task, training: Training, best_of: BestOf | None = None,
                    probe: bool = False, show: Show | None = None, rungs: Rungs | None = None,
                    checkpoints: dict[str, Checkpoint] | None = None
                    ) -> Callable[[list[TrialSpec]], list[TrialResult]]:
        """Train a group of trials (shown by `show`; evaluated at `rungs`; resumed from their
        `checkpoints`, by trial key); a probe trains one step and evaluates nothing."""
        if probe:
            task, train, best_of = without_evaluation(task), one_step(training.train), None
        else:
            train = training.train
        return lambda group: self._train_group(
            self.bench.base, task, train, group, self.sizes.device, best_of=best_of,
            progress=show(group) if show is not None else None, rungs=rungs,
            resume=[checkpoints[t.key] for t in group] if checkpoints else None)

    def describe(self, trials: list[TrialSpec]) -> DryRun:
        """Each group with its predicted peak memory (loads nothing more; measures)."""
        sizes, study = self.sizes, self.study
        groups: dict[str, list[TrialSpec]] = {}
        for trial in trials:
            groups.setdefault(trial.group_key, []).append(trial)
        lines = []
        for specs in groups.values():
            cell = specs[0].cell
            training = resolve_training(study.train, cell.recipe)
            probe = self._group_step(self.bench.task_for(training), training, probe=True)
            fusable = self.bench.fusable(cell)
            peaks = sizes.peaks.get(cell.key) or probe_peaks(probe, specs[0], fusable,
                                                             sizes.device)
            sizes.peaks[cell.key] = peaks
            k = sizes.size(cell.key, fusable, lambda peaks=peaks: peaks)
            for start in range(0, len(specs), k):
                group = specs[start:start + k]
                lrs = ", ".join(f"{t.lr:.3g}" for t in group)
                over = (" (over the budget even alone: it may run out of memory)"
                        if sizes.automatic and peaks.at(len(group)) > sizes.budget() else "")
                lines.append(f"  {describe_cell(cell)} seed {specs[0].seed}: K={len(group)}, "
                             f"lr {lrs}: predicted peak {format_bytes(peaks.at(len(group)))}"
                             f"{over}")
        size = ("as many as fit" if sizes.automatic and sizes.max_group is None
                else f"at most {sizes.max_group}")
        budget = (f"; budget {format_bytes(sizes.budget())} "
                  f"({'--memory-limit' if sizes.memory_limit else 'free memory x 0.9'})"
                  if sizes.automatic else "")
        return DryRun(how=f"on {sizes.device}, {size} per group{budget}", groups=lines,
                      notes=[f"peak memory: {how_measured(sizes.device)}, predicted for K as "
                             "peak(1) + (K-1) x (peak(2) - peak(1))",
                             *self.bench.alone.values()])


def check_memory(study: Study, bench: Workbench, sizes: GroupSizes) -> None:
    """Refuse a step that cannot fit: a lower bound on one training step's activations (each of
    K trials keeps every layer's hidden states for the backward pass, and a causal LM its
    logits) against the memory free now. Only a lower bound, so it never refuses what fits: a
    micro-batch (train.grad_accum) is what a step holds, and a group sized automatically
    (--max-group auto) holds one trial at least."""
    config = bench.base.config
    trainings = [resolve_training(study.train, text) for text in recipes_of(study)]
    batch = min(max(r.train.batch_size // r.train.grad_accum for r in trainings),
                len(bench.task.train))
    group = 1 if sizes.automatic else sizes.max_group
    seq_len = max(r.train.seq_len for r in trainings)
    per_token = getattr(config, "hidden_size", 0) * getattr(config, "num_hidden_layers", 0) + (
        0 if kind_of(study.task.kind).labels else getattr(config, "vocab_size", 0))
    need = (group * batch * seq_len * per_token
            * (2 if study.train.precision == "bf16" else 4))
    free = free_memory(sizes.device)
    if need > free:
        raise StudyError(f"micro-batch x train.seq_len x --max-group ({batch} x {seq_len} x "
                         f"{group}): one step needs at least {format_bytes(need)}; "
                         f"{format_bytes(free)} is free on {sizes.device}: lower one of them")


def _best_of(study: Study) -> BestOf | None:
    """task.select 'best' as train_group takes it (None: the final evaluation counts)."""
    if study.task.select != "best":
        return None
    return BestOf(study.task.objective, study.task.maximize)
