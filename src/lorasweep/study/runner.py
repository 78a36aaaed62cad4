"""`lorasweep run`: load once, then claim groups of trials from the store and train them.

Everything that can be wrong with the input (study file, data, model, target modules) is checked
before the store is touched, so a bad run never disturbs what a study already recorded.
"""

from __future__ import annotations

import copy
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorasweep.config import TARGETS_AXIS, Study
from lorasweep.errors import StudyError
from lorasweep.methods import get_method
from lorasweep.methods.peft_passthrough import needs_data
from lorasweep.methods.targets import adapter_width, resolve_targets
from lorasweep.models import load_model, load_tokenizer
from lorasweep.recipe import Recipe, resolve_recipe
from lorasweep.report import write_report
from lorasweep.results import write_trials_csv
from lorasweep.space import TrialSpec, expand_trials, recipes_of, target_text
from lorasweep.study.folder import prepare_folder, save_weights
from lorasweep.study.store import LEASE_SECONDS, Store
from lorasweep.tasks import Task, build_task, num_labels
from lorasweep.train import train_group


def default_max_group(device: str) -> int:
    """Trials per fused group when the user does not say.

    Each trial in a group adds its own activations, so memory grows about linearly in K. On a
    CPU the work is compute-bound and fusing measured no faster (benchmarks/README.md), so the CPU
    default is 1; on a GPU a group fills the device that one small trial leaves idle.
    """
    return 1 if device == "cpu" else 8


@dataclass
class Workbench:
    """What every group of a study shares, loaded once per process."""

    task: Task
    base: nn.Module
    tasks: dict[int, Task] = field(default_factory=dict)  # the task at each swept seq_len
    widths: dict[str, int] | None = None  # adapter width per target set, for match_params

    def task_for(self, recipe: Recipe) -> Task:
        """What a trial trains on: the task at its sequence length, cut to its subset."""
        task = self.tasks.get(recipe.train.seq_len, self.task)
        return task.with_train_examples(recipe.train_examples)


def load_workbench(study: Study) -> Workbench:
    tokenizer = load_tokenizer(study.model)
    task = build_task(study, tokenizer)
    recipes = [resolve_recipe(study.train, text) for text in recipes_of(study)]
    tasks = {seq_len: build_task(study, tokenizer, seq_len)
             for seq_len in {r.train.seq_len for r in recipes} - {study.train.seq_len}}
    for recipe in recipes:
        if recipe.train_examples is not None and recipe.train_examples > len(task.train):
            raise StudyError(f"search.recipe.train_examples: {recipe.train_examples} is more "
                             f"than the {len(task.train)} training examples (after validation)")
    base = load_model(study.model, study.task.kind, num_labels(task), tokenizer)
    widths = None
    if study.search.match_params:
        widths = {target_text(t): adapter_width(base, target_text(t))
                  for t in study.search.recipe[TARGETS_AXIS]}
    for cell in {t.cell for t in expand_trials(study, widths)}:
        if cell.is_adapter:
            resolve_targets(base, cell.target_modules)
        if cell.method == "peft" and not needs_data(cell):
            # PEFT checks its configuration against the model only when it builds it (inits that
            # need data are built at training time: a dry run would cost a calibration pass)
            try:
                get_method("peft").attach(copy.deepcopy(base), cell, 1, torch.Generator())
            except (TypeError, ValueError, KeyError) as exc:
                raise StudyError(f"search.methods: peft entry '{cell.label}' cannot be built: "
                                 f"{str(exc).splitlines()[0]}") from None
    return Workbench(task=task, base=base, tasks=tasks, widths=widths)


@dataclass
class RunSummary:
    folder: Path
    trained: int
    failed: int


def run_study(study: Study, folder: Path, max_group: int = 1,
              retry_failed: bool = False, device: str = "cpu") -> RunSummary:
    """Run every missing trial of the study in `folder`, then write trials.csv and the report."""
    bench = load_workbench(study)
    prepare_folder(folder, study)
    store = Store(folder, study.name, maximize=bench.task.greater_is_better)
    grid = expand_trials(study, bench.widths)
    store.sync(grid, retry_failed=retry_failed)
    todo = len([s for s, _, _ in store.latest_by_key().values() if s == "waiting"])
    trained = failed = 0
    overall = tqdm(total=todo, desc=f"study {study.name}", unit="trial", disable=None)
    try:
        while claimed := _next_group(store, grid, max_group):
            ids = [trial_id for trial_id, _ in claimed]
            specs = [spec for _, spec in claimed]
            failed += _train_claimed(store, bench, study, folder, ids, specs,
                                     torch.device(device))
            trained += len(specs)
            overall.update(len(specs))
            write_trials_csv(folder, store, bench.task.metric_name)
    finally:
        overall.close()
        rows = write_trials_csv(folder, store, bench.task.metric_name)
    write_report(folder, rows, bench.task.metric_name, bench.task.greater_is_better, study.name)
    return RunSummary(folder=folder, trained=trained, failed=failed)


def _next_group(store: Store, grid: list[TrialSpec], max_group: int
                ) -> list[tuple[int, TrialSpec]]:
    """The next group to train; when none is waiting, requeue runs whose worker died (failed
    trials are retried only once, at the start, with --retry-failed)."""
    claimed = store.claim_group(max_group)
    if not claimed and store.sync(grid):
        claimed = store.claim_group(max_group)
    return claimed


def _train_claimed(store: Store, bench: Workbench, study: Study, folder: Path, ids: list[int],
                   specs: list[TrialSpec], device: torch.device) -> int:
    """Train one claimed group and record it; returns how many of its trials failed."""
    try:
        recipe = resolve_recipe(study.train, specs[0].cell.recipe)
        with _heartbeat(store, ids):
            results = train_group(bench.base, bench.task_for(recipe), recipe.train, specs, device)
    except KeyboardInterrupt:
        for trial_id in ids:
            store.record_failure(trial_id, "interrupted by the user", status="interrupted")
        raise
    except Exception as exc:  # a crash fails these trials; the study goes on
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        tqdm.write(f"trials {[s.grid_id for s in specs]} failed: {message}")
        tqdm.write(traceback.format_exc(limit=-3))
        for trial_id in ids:
            store.record_failure(trial_id, message)
        return len(ids)
    for trial_id, spec, result in zip(ids, specs, results, strict=True):
        if not store.still_ours(trial_id):  # declared dead and requeued: the rerun records it
            tqdm.write(f"trial {spec.grid_id}: its lease was taken over; result not recorded")
            continue
        if result.weights is not None:
            save_weights(folder, spec.grid_id, result.weights)
        store.record(trial_id, result, bench.task.metric_name)
    return 0


@contextmanager
def _heartbeat(store: Store, ids: list[int]):
    """Renew the lease of the claimed trials while they train."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(LEASE_SECONDS / 6):
            try:
                for trial_id in ids:
                    store.heartbeat(trial_id)
            except Exception as exc:  # a storage hiccup must not end the lease for good
                tqdm.write(f"heartbeat failed, will retry: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
