"""`lorasweep run`: load once, then claim groups of trials from the store and train them.

Everything that can be wrong with the input (study file, data, model, target modules) is checked
before the store is touched, so a bad run never disturbs what a study already recorded.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm  # its write() keeps a message clear of the live progress line

from lorasweep.config import Study, dump_study
from lorasweep.errors import StudyError
from lorasweep.files import is_disk_full
from lorasweep.recipe import Training, resolve_training
from lorasweep.records import TrialResult, write_trials_csv
from lorasweep.report import write_study_outputs
from lorasweep.space import TrialSpec, recipes_of
from lorasweep.study.folder import (
    load_folder_study,
    open_for_reading,
    open_for_running,
    save_weights,
)
from lorasweep.study.local_workers import run_local_workers
from lorasweep.study.memory import (
    GroupSizes,
    format_bytes,
    free_memory,
    how_measured,
    one_step,
    probe_peaks,
    train_fitting,
    without_evaluation,
)
from lorasweep.study.options import WorkOptions
from lorasweep.study.plan import plan_trials, planner
from lorasweep.study.progress import RunProgress
from lorasweep.study.store import Store
from lorasweep.tasks import Task
from lorasweep.train import BestOf, train_group
from lorasweep.workbench import Workbench, load_workbench

POLL_SECONDS = 5.0  # how often an idle worker looks for trials that others left behind


def default_max_group(device: str) -> int | None:
    """Trials per fused group when the user does not say (None: sized automatically).

    On a CPU the work is compute-bound and fusing measured no faster (benchmarks/README.md), so
    the CPU default is 1; on a GPU a group fills the device that one small trial leaves idle, as
    many trials as fit its memory (study/memory.py).
    """
    return 1 if device == "cpu" else None


def check_memory(study: Study, bench: Workbench, options: WorkOptions) -> None:
    """Refuse a step that cannot fit: a lower bound on one training step's activations (each of
    K trials keeps every layer's hidden states for the backward pass, and a causal LM its
    logits) against the memory free now. Only a lower bound, so it never refuses what fits: a
    micro-batch (train.grad_accum) is what a step holds, and a group sized automatically
    (--max-group auto) holds one trial at least."""
    config = bench.base.config
    trainings = [resolve_training(study.train, text) for text in recipes_of(study)]
    batch = min(max(r.train.batch_size // r.train.grad_accum for r in trainings),
                len(bench.task.train))
    group = 1 if options.group_sizes().automatic else options.max_group
    seq_len = max(r.train.seq_len for r in trainings)
    per_token = getattr(config, "hidden_size", 0) * getattr(config, "num_hidden_layers", 0) + (
        getattr(config, "vocab_size", 0) if study.task.kind != "classification" else 0)
    need = (group * batch * seq_len * per_token
            * (2 if study.train.precision == "bf16" else 4))
    free = free_memory(torch.device(options.device))
    if need > free:
        raise StudyError(f"micro-batch x train.seq_len x --max-group ({batch} x {seq_len} x "
                         f"{group}): one step needs at least {format_bytes(need)}; "
                         f"{format_bytes(free)} is free on {options.device}: lower one of them")


@dataclass
class RunSummary:
    folder: Path
    trained: int
    failed: int


def run_study(study: Study, folder: Path, options: WorkOptions = WorkOptions(),
              retry_failed: bool = False, storage_url: str | None = None,
              workers: int = 1, threads: int | None = None,
              lease_seconds: float | None = None, max_attempts: int | None = None) -> RunSummary:
    """Run every missing trial of the study in `folder`, then write trials.csv and the report.

    The study is created and its grid enqueued here, once; then this process trains (one
    worker) or starts `workers` worker processes that share the store and waits for them.
    """
    bench = load_workbench(study, options.device)
    check_memory(study, bench, options)
    store = open_for_running(study, folder, storage_url, options.patience)
    store.keep_targets(bench.targets)
    store.configure(dump_study(study), lease_seconds, max_attempts)
    store.sync(_planner(study, store, bench.widths)(), retry_failed=retry_failed)
    if workers == 1:
        trained, failed = work(store, bench, study, folder, options)
    else:
        del bench  # checked; each worker process loads its own copy
        trained, failed = run_local_workers(store, folder, workers, options, threads,
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
        study, _ = open_for_reading(folder, storage_url, study_name=study_name,
                                    patience=options.patience)
        folder = folder or Path("lorasweep-studies") / study.name
    elif folder is not None:
        study = load_folder_study(folder)
    else:
        raise StudyError("lorasweep worker: give a study folder, or --storage URL and --study NAME")
    bench = load_workbench(study, options.device)
    check_memory(study, bench, options)
    store = open_for_running(study, folder, storage_url, options.patience)
    store.keep_targets(bench.targets)
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
    sizes = options.group_sizes()
    trained = failed = 0
    todo = len([s for s, _, _ in store.latest_by_key().values() if s == "waiting"])
    progress = RunProgress(f"study {study.name}", todo)
    try:
        while True:
            claimed = store.claim_group(sizes.claim)
            if not claimed:
                added = store.sync(plan())  # new plan entries, dead runs requeued
                progress.planned(added)
                claimed = store.claim_group(sizes.claim) if added else []
            if not claimed:
                if not store.others_running():
                    break
                time.sleep(min(POLL_SECONDS, store.lease_seconds / 6))
                continue
            ids = [trial_id for trial_id, _ in claimed]
            specs = [spec for _, spec in claimed]
            failed += _train_claimed(store, bench, study, folder, ids, specs, sizes, progress)
            trained += len(specs)
            write_trials_csv(folder, store, study.task.objective)
    finally:
        progress.close()
    return trained, failed


def _planner(study: Study, store: Store, widths: dict[str, int] | None
             ) -> Callable[[], list[TrialSpec]]:
    """What the study should have enqueued now: the grid, or a transfer search's next trials.

    Workers re-plan whenever nothing waits, so brackets appear as reference cells finish and
    trials whose worker died are requeued (failed ones only at the start, with --retry-failed).
    """
    return planner(study, store, study.task.objective, study.task.maximize, widths)


def _train_claimed(store: Store, bench: Workbench, study: Study, folder: Path, ids: list[int],
                   specs: list[TrialSpec], sizes: GroupSizes, progress: RunProgress) -> int:
    """Train the claimed trials of one group, as many at a time as fit, recording each group as
    it finishes; returns how many trials failed."""
    recorded = 0
    try:
        training = resolve_training(study.train, specs[0].cell.recipe)
        task = bench.task_for(training)
        cell = specs[0].cell
        trials = dict(zip((s.key for s in specs), ids, strict=True))
        with _heartbeat(store, ids):
            k = 1 if len(specs) == 1 else sizes.size(cell.key, cell.fusable, lambda: probe_peaks(
                _trainer(bench, task, training, sizes.device, probe=True), specs[0], cell.fusable,
                sizes.device))
            trainer = _trainer(bench, task, training, sizes.device, best_of=_best_of(study),
                               progress=progress)
            for group, results in train_fitting(trainer, specs, k,
                                                lambda n: sizes.shrink(cell.key, n)):
                for spec, result in zip(group, results, strict=True):
                    _record(store, folder, study, trials[spec.key], spec, result)
                recorded += len(group)
                progress.finished(group)
    except KeyboardInterrupt:
        for trial_id in ids[recorded:]:
            store.record_failure(trial_id, "interrupted by the user", status="interrupted")
        raise
    except Exception as exc:  # a crash fails these trials; the study goes on
        if is_disk_full(exc):  # ...but a full disk stops it (cli.py says so in one line)
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        tqdm.write(f"trials {[s.grid_id for s in specs[recorded:]]} failed: {message}")
        tqdm.write(traceback.format_exc(limit=-3))
        for trial_id in ids[recorded:]:
            store.record_failure(trial_id, message)
        progress.finished(specs[recorded:])
        return len(ids) - recorded
    return 0


def _best_of(study: Study) -> BestOf | None:
    """task.select 'best' as train_group takes it (None: the final evaluation counts)."""
    if study.task.select != "best":
        return None
    return BestOf(study.task.objective, study.task.maximize)


def _trainer(bench: Workbench, task: Task, training: Training, device: torch.device,
             best_of: BestOf | None = None, probe: bool = False,
             progress: RunProgress | None = None
             ) -> Callable[[list[TrialSpec]], list[TrialResult]]:
    """Train a group of trials (shown by `progress`); a probe trains one step and evaluates
    nothing."""
    if probe:
        task, train, best_of = without_evaluation(task), one_step(training.train), None
    else:
        train = training.train
    return lambda group: train_group(bench.base, task, train, group, device, best_of=best_of,
                                     progress=progress.start(group) if progress else None)


def _record(store: Store, folder: Path, study: Study, trial_id: int, spec: TrialSpec,
            result: TrialResult) -> None:
    if not store.still_ours(trial_id):  # declared dead and requeued: the rerun records it
        tqdm.write(f"trial {spec.grid_id}: its lease was taken over; result not recorded")
        return
    if result.weights is not None:
        save_weights(folder, spec.grid_id, result.weights)
    if not store.record(trial_id, result, study.task.objective):
        tqdm.write(f"trial {spec.grid_id}: its lease was taken over; result not recorded")


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


def dry_run(study: Study, folder: Path, options: WorkOptions) -> str:
    """`lorasweep run --dry-run`: the trials a fresh run would plan, in the groups a worker would
    train them, with each group's predicted peak memory. Loads the model and measures; writes
    nothing anywhere."""
    bench = load_workbench(study, options.device)
    sizes = options.group_sizes()
    trials = plan_trials(study, {}, study.task.maximize, bench.widths)
    groups: dict[str, list[TrialSpec]] = {}
    for trial in trials:
        groups.setdefault(trial.group_key, []).append(trial)
    lines = []
    for specs in groups.values():
        cell = specs[0].cell
        training = resolve_training(study.train, cell.recipe)
        probe = _trainer(bench, bench.task_for(training), training, sizes.device, probe=True)
        peaks = sizes.peaks.get(cell.key) or probe_peaks(probe, specs[0], cell.fusable,
                                                         sizes.device)
        sizes.peaks[cell.key] = peaks
        k = sizes.size(cell.key, cell.fusable, lambda peaks=peaks: peaks)
        for start in range(0, len(specs), k):
            group = specs[start:start + k]
            lrs = ", ".join(f"{t.lr:.3g}" for t in group)
            over = (" (over the budget even alone: it may run out of memory)"
                    if sizes.automatic and peaks.at(len(group)) > sizes.budget() else "")
            lines.append(f"  {_describe_cell(cell)} seed {specs[0].seed}: K={len(group)}, "
                         f"lr {lrs}: predicted peak {format_bytes(peaks.at(len(group)))}{over}")
    size = ("as many as fit" if sizes.automatic and options.max_group is None
            else f"at most {options.max_group}")
    budget = (f"; budget {format_bytes(sizes.budget())} "
              f"({'--memory-limit' if options.memory_limit else 'free memory x 0.9'})"
              if sizes.automatic else "")
    planned = ("the whole grid" if study.search.strategy == "grid"
               else "the first wave of the transfer search; brackets follow its results")
    existing = (f"; {folder} exists: the trials it has recorded are not left out here"
                if folder.exists() else "")
    return "\n".join([
        f"dry run of study {study.name}: {len(trials)} trials ({planned}) in "
        f"{len(lines)} group{'s' if len(lines) != 1 else ''} "
        f"on {options.device}, {size} per group{budget}{existing}",
        f"peak memory: {how_measured(sizes.device)}, predicted for K as "
        "peak(1) + (K-1) x (peak(2) - peak(1))",
        *lines,
        f"nothing was written (dry run); run without --dry-run to train into {folder}"])


def _describe_cell(cell) -> str:
    if not cell.is_adapter:
        return cell.label
    recipe = f" {cell.recipe}" if cell.recipe else ""
    return (f"{cell.label} r={cell.rank} lora_alpha={cell.alpha:g} {cell.init} "
            f"{cell.target_modules}{recipe}")
