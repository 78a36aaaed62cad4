"""`lorasweep run`: load once, then claim groups of trials from the store and train them.

Everything that can be wrong with the input (study file, data, model, target modules) is checked
before the store is touched, so a bad run never disturbs what a study already recorded.
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from lorasweep.config import TARGETS_AXIS, Study, dump_study, validate_study
from lorasweep.errors import StudyError
from lorasweep.methods import get_method
from lorasweep.methods.peft_passthrough import needs_data
from lorasweep.methods.targets import adapter_width, resolve_targets
from lorasweep.models import load_model, load_tokenizer
from lorasweep.precision import base_dtype, check_device_support
from lorasweep.recipe import Recipe, resolve_recipe
from lorasweep.report import write_study_outputs
from lorasweep.results import write_trials_csv
from lorasweep.space import TrialSpec, expand_trials, recipes_of, target_text
from lorasweep.study.defaults import DEFAULT_PATIENCE_SECONDS
from lorasweep.study.folder import load_folder_study, prepare_folder, save_weights, storage_of
from lorasweep.study.local_workers import run_local_workers
from lorasweep.study.plan import planner
from lorasweep.study.storage import public_url
from lorasweep.study.store import Store
from lorasweep.tasks import Task, build_task, num_labels
from lorasweep.train import train_group

POLL_SECONDS = 5.0  # how often an idle worker looks for trials that others left behind


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


def load_workbench(study: Study, device: str = "cpu") -> Workbench:
    """The study's data and base model (stored in the dtype it trains in on `device`)."""
    check_device_support(study, device)
    tokenizer = load_tokenizer(study.model)
    task = build_task(study, tokenizer)
    recipes = [resolve_recipe(study.train, text) for text in recipes_of(study)]
    tasks = {seq_len: build_task(study, tokenizer, seq_len)
             for seq_len in {r.train.seq_len for r in recipes} - {study.train.seq_len}}
    for recipe in recipes:
        if recipe.train_examples is not None and recipe.train_examples > len(task.train):
            raise StudyError(f"search.recipe.train_examples: {recipe.train_examples} is more "
                             f"than the {len(task.train)} training examples (after validation)")
    base = load_model(study.model, study.task.kind, num_labels(task), tokenizer,
                      base_dtype(study.model, study.train, device))
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


@dataclass(frozen=True)
class WorkOptions:
    """How one worker trains: its device, its group size, its patience with the storage."""

    device: str = "cpu"
    max_group: int = 1
    patience: float = DEFAULT_PATIENCE_SECONDS


def open_study_store(study: Study, folder: Path, storage_url: str | None,
                     patience: float = DEFAULT_PATIENCE_SECONDS) -> Store:
    """Prepare the folder and open (creating once) the study's store."""
    prepare_folder(folder, study, storage_url)
    return Store(folder, study.name, maximize=study.task.maximize, storage_url=storage_url or
                 storage_of(folder), patience=patience)


def run_study(study: Study, folder: Path, options: WorkOptions = WorkOptions(),
              retry_failed: bool = False, storage_url: str | None = None,
              workers: int = 1, threads: int | None = None,
              lease_seconds: float | None = None, max_attempts: int | None = None) -> RunSummary:
    """Run every missing trial of the study in `folder`, then write trials.csv and the report.

    The study is created and its grid enqueued here, once; then this process trains (one
    worker) or starts `workers` worker processes that share the store and waits for them.
    """
    bench = load_workbench(study, options.device)
    store = open_study_store(study, folder, storage_url, options.patience)
    store.configure(dump_study(study), lease_seconds, max_attempts)
    store.sync(_planner(study, store, bench.widths)(), retry_failed=retry_failed)
    if workers == 1:
        trained, failed = work(store, bench, study, folder, options)
    else:
        del bench  # checked; each worker process loads its own copy
        trained, failed = run_local_workers(store, folder, workers, options.device,
                                            options.max_group, options.patience, threads,
                                            storage_url)
    write_study_outputs(folder, store, study)
    return RunSummary(folder=folder, trained=trained, failed=failed)


def run_worker(options: WorkOptions, folder: Path | None = None,
               storage_url: str | None = None, study_name: str | None = None) -> RunSummary:
    """`lorasweep worker`: join a study (by its folder, or by its database and name) and train.

    A worker elsewhere needs only the storage: the resolved study file is kept there, and the
    worker writes its own folder (adapters, trials.csv, the environment it ran in).
    """
    if study_name is not None:
        if storage_url is None:
            raise StudyError("--study: needs --storage URL (the database the study lives in)")
        source = Store(Path("."), study_name, maximize=True, create=False,
                       storage_url=storage_url, patience=options.patience)
        study = validate_study(yaml.safe_load(source.study_text()),
                               f"--storage {public_url(storage_url)} study {study_name}")
        folder = folder or Path("lorasweep-studies") / study.name
    elif folder is not None:
        study = load_folder_study(folder)
        storage_url = storage_url or storage_of(folder)
    else:
        raise StudyError("lorasweep worker: give a study folder, or --storage URL and --study NAME")
    bench = load_workbench(study, options.device)
    store = open_study_store(study, folder, storage_url, options.patience)
    trained, failed = work(store, bench, study, folder, options)
    return RunSummary(folder=folder, trained=trained, failed=failed)


def work(store: Store, bench: Workbench, study: Study, folder: Path,
         options: WorkOptions) -> tuple[int, int]:
    """Claim and train groups until no trial waits and none runs elsewhere.

    A worker with nothing to claim stays while others run: if one of them dies, its trials come
    back to the queue once their lease runs out, and someone must be there to take them.
    Returns (trials trained, trials failed).
    """
    plan = _planner(study, store, bench.widths)
    device = torch.device(options.device)
    trained = failed = 0
    todo = len([s for s, _, _ in store.latest_by_key().values() if s == "waiting"])
    overall = tqdm(total=todo, desc=f"study {study.name}", unit="trial", disable=None)
    try:
        while True:
            claimed = store.claim_group(options.max_group)
            if not claimed and store.sync(plan()):  # new plan entries, dead runs requeued
                claimed = store.claim_group(options.max_group)
            if not claimed:
                if not store.others_running():
                    break
                time.sleep(min(POLL_SECONDS, store.lease_seconds / 6))
                continue
            ids = [trial_id for trial_id, _ in claimed]
            specs = [spec for _, spec in claimed]
            failed += _train_claimed(store, bench, study, folder, ids, specs, device)
            trained += len(specs)
            overall.update(len(specs))
            write_trials_csv(folder, store, study.task.objective)
    finally:
        overall.close()
    return trained, failed


def _planner(study: Study, store: Store, widths: dict[str, int] | None
             ) -> Callable[[], list[TrialSpec]]:
    """What the study should have enqueued now: the grid, or a transfer search's next trials.

    Workers re-plan whenever nothing waits, so brackets appear as reference cells finish and
    trials whose worker died are requeued (failed ones only at the start, with --retry-failed).
    """
    return planner(study, store, study.task.objective, study.task.maximize, widths)


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
        if not store.record(trial_id, result, study.task.objective):
            tqdm.write(f"trial {spec.grid_id}: its lease was taken over; result not recorded")
    return 0


@contextmanager
def _heartbeat(store: Store, ids: list[int]):
    """Renew the lease of the claimed trials while they train."""
    stop = threading.Event()
    interval = store.lease_seconds / 6

    def beat() -> None:
        while not stop.wait(interval):
            try:
                for trial_id in ids:
                    store.heartbeat(trial_id)
            except Exception as exc:  # an outage beyond patience must not end the lease for good
                tqdm.write(f"heartbeat failed, will retry: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
