"""`lorasweep run`: load once, then claim groups of trials from the store and train them.

Everything that can be wrong with the input (study file, data, model, target modules) is checked
before the store is touched, so a bad run never disturbs what a study already recorded.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import FrozenTrial
from tqdm.auto import tqdm  # its write() keeps a message clear of the live progress line

from lorasweep.config import Study, dump_study
from lorasweep.errors import StudyError, Terminated
from lorasweep.files import is_disk_full
from lorasweep.records import TrialResult, trial_row, write_trials_csv
from lorasweep.report import write_study_outputs
from lorasweep.space import TrialSpec
from lorasweep.study.folder import (
    as_in_folder,
    drop_checkpoints,
    load_checkpoints,
    load_folder_study,
    open_for_reading,
    open_for_running,
    save_checkpoint,
    save_weights,
)
from lorasweep.study.local_workers import run_local_workers
from lorasweep.study.options import WorkOptions
from lorasweep.study.plan import Plan, plan_trials, planner
from lorasweep.study.progress import RunProgress
from lorasweep.study.store import Claimed, Store
from lorasweep.tracking import FINISHED, Tracking, check_tracking, open_tracking, tracked_trial
from lorasweep.tracking.trial import TrackedTrial
from lorasweep.train import train_group
from lorasweep.trainers import Trainer
from lorasweep.trainers.command import CommandTrainer
from lorasweep.trainers.fused import FusedTrainer
from lorasweep.workbench import load_workbench

POLL_SECONDS = 5.0  # how often an idle worker looks for trials that others left behind


def default_max_group(device: str) -> int | None:
    """Trials per fused group when the user does not say (None: sized automatically).

    On a CPU the work is compute-bound and fusing measured no faster (benchmarks/README.md), so
    the CPU default is 1; on a GPU a group fills the device that one small trial leaves idle, as
    many trials as fit its memory (trainers/memory.py).
    """
    return 1 if device == "cpu" else None


def trainer_for(study: Study, folder: Path, options: WorkOptions) -> Trainer:
    """The study's trainer, made once per process: its external command (`trainer:` in the
    study file), else lorasweep's own engine over the base model and data loaded here."""
    if study.trainer is not None:
        return CommandTrainer(study, folder)
    return FusedTrainer(study, load_workbench(study, options.device), options.group_sizes(),
                        train_group)


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
    study, store, trainer = start_study(study, folder, options, retry_failed, storage_url,
                                        lease_seconds, max_attempts)
    tracking = open_tracking(study, folder)
    _catch_up(tracking, store, study)  # what an earlier run recorded but did not log
    if workers == 1:
        trained, failed = work(store, trainer, study, folder, tracking)
    else:
        del trainer  # checked; each worker process makes its own
        trained, failed = run_local_workers(store, folder, workers, options, threads,
                                            storage_url)
    write_study_outputs(folder, store, study)
    _catch_up(tracking, store, study)  # trials stopped at a rung, records a worker did not log
    return RunSummary(folder=folder, trained=trained, failed=failed)


def start_study(study: Study, folder: Path, options: WorkOptions, retry_failed: bool = False,
                storage_url: str | None = None, lease_seconds: float | None = None,
                max_attempts: int | None = None) -> tuple[Study, Store, Trainer]:
    """Check the study, then create it in its store (once) with its settings and its first
    plan enqueued: what every launcher (`run`, `run --workers`, `slurm`) does before workers
    start, so a bad study never reaches a queue."""
    study = as_in_folder(study, folder)
    check_tracking(study)
    trainer = trainer_for(study, folder, options)
    trainer.check()
    store = open_for_running(study, folder, storage_url, options.patience)
    trainer.keep_in(store)
    store.configure(dump_study(study), lease_seconds, max_attempts)
    _sync(store, folder, _planner(study, store, trainer.widths)(), retry_failed=retry_failed)
    return study, store, trainer


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
    check_tracking(study)
    trainer = trainer_for(study, folder, options)
    trainer.check()
    store = open_for_running(study, folder, storage_url, options.patience)
    trainer.keep_in(store)
    trained, failed = work(store, trainer, study, folder, open_tracking(study, folder))
    return RunSummary(folder=folder, trained=trained, failed=failed)


def work(store: Store, trainer: Trainer, study: Study, folder: Path,
         tracking: Tracking | None = None) -> tuple[int, int]:
    """Claim and train groups until no trial waits and none runs elsewhere; each trial recorded
    is also logged to the study's trackers (`tracking`).

    A worker with nothing to claim stays while others run: if one of them dies, its trials come
    back to the queue once their lease runs out, and someone must be there to take them.
    Returns (trials trained, trials failed).
    """
    plan = _planner(study, store, trainer.widths)
    trained = failed = 0
    todo = len([s for s, _, _ in store.latest_by_key().values() if s == "waiting"])
    # with search.stop_early stopping, a trial trains in segments, rung to rung: those are counted
    rule = study.search.stop_early
    progress = RunProgress(f"study {study.name}", todo,
                           unit="segment" if rule is not None and rule.stop else "trial")
    try:
        with _terminable():
            while True:
                claimed = store.claim_group(trainer.claim_size())
                if not claimed:
                    # new plan entries, rung decisions carried out, dead runs requeued
                    added = _sync(store, folder, plan())
                    progress.planned(added)
                    claimed = store.claim_group(trainer.claim_size()) if added else []
                if not claimed:
                    if not store.others_running():
                        break
                    time.sleep(min(POLL_SECONDS, store.lease_seconds / 6))
                    continue
                failed += _train_claimed(store, trainer, study, folder, claimed, progress,
                                         tracking)
                trained += len(claimed)
                write_trials_csv(folder, store, study.task.objective)
    finally:
        progress.close()
    return trained, failed


def _planner(study: Study, store: Store, widths: dict[str, int] | None
             ) -> Callable[[], Plan]:
    """What the study should have enqueued now: the grid, or a transfer search's next trials,
    and which trials paused at a rung go on or stop (search.stop_early).

    Workers re-plan whenever nothing waits, so brackets appear as reference cells finish, rungs
    are decided as cells reach them, and trials whose worker died are requeued (failed ones
    only at the start, with --retry-failed).
    """
    return planner(study, store, study.task.maximize, widths)


def _sync(store: Store, folder: Path, plan: Plan, retry_failed: bool = False) -> int:
    """Bring the store to the plan; the checkpoints of trials that ended are deleted."""
    added = store.sync(plan.trials, retry_failed=retry_failed, go=plan.decisions.go,
                       stop=plan.decisions.stop)
    drop_checkpoints(folder, store)
    return added


def _train_claimed(store: Store, trainer: Trainer, study: Study, folder: Path,
                   claimed: list[Claimed], progress: RunProgress,
                   tracking: Tracking | None = None) -> int:
    """Train the claimed trials of one group (from the checkpoints of a rung they paused at,
    or without them from the start), recording each trial as it finishes (and showing it in
    `progress`); returns how many trials failed."""
    specs = [c.spec for c in claimed]
    ids = [c.trial_id for c in claimed]
    left = dict(zip((s.key for s in specs), ids, strict=True))  # claimed, not yet recorded
    after = claimed[0].from_step
    checkpoints = load_checkpoints(folder, specs, after) if after else None

    def record(spec: TrialSpec, result: TrialResult) -> None:
        trial_id = left.pop(spec.key)
        if _record(store, folder, study, trial_id, spec, result) and tracking is not None:
            _track(tracking, store, study, trial_id)
        progress.finished([spec])

    try:
        with _heartbeat(store, ids):
            trainer.train(specs, record, progress.start, after, checkpoints)
    except KeyboardInterrupt:
        for trial_id in left.values():
            store.record_failure(trial_id, "interrupted by the user", status="interrupted")
        raise
    except Terminated:  # preempted, timed out, cancelled: the lease rules take the trials back
        for trial_id in left.values():
            store.release(trial_id)
        raise
    except Exception as exc:  # a crash fails these trials; the study goes on
        if is_disk_full(exc):  # ...but a full disk stops it (cli.py says so in one line)
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        tqdm.write(f"trials {[s.grid_id for s in specs if s.key in left]} failed: {message}")
        tqdm.write(traceback.format_exc(limit=-3))
        for trial_id in left.values():
            store.record_failure(trial_id, message)
        progress.finished([s for s in specs if s.key in left])
        return len(left)
    return 0


def _record(store: Store, folder: Path, study: Study, trial_id: int, spec: TrialSpec,
            result: TrialResult) -> bool:
    """Record a finished trial (or a paused segment); False when its lease was taken over."""
    if not store.still_ours(trial_id):  # declared dead and requeued: the rerun records it
        tqdm.write(f"trial {spec.grid_id}: its lease was taken over; result not recorded")
        return False
    if result.weights is not None:
        save_weights(folder, spec.grid_id, result.weights)
    if result.checkpoint is not None:
        save_checkpoint(folder, spec.grid_id, result.checkpoint)
    if not store.record(trial_id, result, study.task.objective):
        tqdm.write(f"trial {spec.grid_id}: its lease was taken over; result not recorded")
        return False
    return True


def _track(tracking: Tracking, store: Store, study: Study, trial_id: int) -> None:
    """Log a trial just recorded to the study's trackers, as the store holds it (trials.csv's
    numbers); whatever goes wrong there is one line, never the trial's or the study's end."""
    try:
        status, trial = store.recorded(trial_id)
        if status in FINISHED:
            tracking.log([_as_run(status, trial, study)])
    except Exception as exc:
        tqdm.write(f"lorasweep: trial {trial_id} not logged to the trackers "
                   f"({type(exc).__name__}: {exc}); the next `lorasweep run` logs it"
                   .splitlines()[0])


def _catch_up(tracking: Tracking | None, store: Store, study: Study) -> None:
    """Log every finished trial the store holds that the trackers do not (each tracker skips
    what it holds): after a kill between a record and its log, or a `track` section added to a
    study that had run without it."""
    if tracking is None:
        return
    tracking.log([_as_run(status, trial, study)
                  for status, trial, _ in store.latest_by_key().values() if status in FINISHED])


def _as_run(status: str, trial: FrozenTrial, study: Study) -> TrackedTrial:
    """A recorded trial as a tracker's run: its trials.csv row, and its curves."""
    return tracked_trial(trial_row(status, trial, study.task.objective), trial.user_attrs)


@contextmanager
def _terminable() -> Iterator[None]:
    """SIGTERM raises Terminated in the worker loop, so that a worker that a scheduler stops
    (SLURM's preemption, time limit or scancel; a deleted Kubernetes pod) gives back the trials
    it runs at once, instead of leaving them to its lease's end. Only the main thread has
    signal handlers; elsewhere (a test calling `work`) SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    train them, as the trainer describes them (the fused engine: each group's predicted peak
    memory, measured). Writes nothing anywhere; a tracker the study names must be installed."""
    check_tracking(study)
    trainer = trainer_for(study, folder, options)
    trials = plan_trials(study, {}, study.task.maximize, trainer.widths)
    described = trainer.describe(trials)
    lines = described.groups
    planned = ("the whole grid" if study.search.strategy == "grid"
               else "the first wave of the transfer search; brackets follow its results")
    rule = study.search.stop_early
    if rule is not None:
        planned += (f"; each evaluated at rungs {', '.join(f'{f:g}' for f in rule.rungs)} of its "
                    "steps" + (", where the LRs that cannot be its cell's optimum stop"
                               if rule.stop else ", stopping none"))
    existing = (f"; {folder} exists: the trials it has recorded are not left out here"
                if folder.exists() else "")
    return "\n".join([
        f"dry run of study {study.name}: {len(trials)} trials ({planned}) in "
        f"{len(lines)} group{'s' if len(lines) != 1 else ''} "
        f"{described.how}{existing}",
        *described.notes,
        *lines,
        f"nothing was written (dry run); run without --dry-run to train into {folder}"])
