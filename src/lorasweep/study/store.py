"""The study's records, kept in an Optuna storage (the folder's journal file, or a database).

Every trial of the grid is enqueued once as a WAITING Optuna trial carrying its spec in user
attributes. A worker claims trials by moving them WAITING -> RUNNING through the storage, which
succeeds for exactly one process, so no trial is trained twice. Outcomes map onto Optuna states:
complete -> COMPLETE (value = the metric), diverged -> PRUNED, failed or interrupted -> FAIL.

With search.stop_early a trial trains in segments, one Optuna trial each: a segment that
reaches a rung is closed as FAIL with status `paused` (its checkpoint in the study folder, its
rung evaluations as Optuna intermediate values); once the plan decides, `sync` enqueues the
next segment (`from_step`: the rung's step) or adds the trial's record as PRUNED with status
`pruned` (a copy of the paused segment's record: its curve, rungs and the reason it stopped).

Leases: a worker renews a heartbeat on the trials it runs. A RUNNING trial whose process is gone
(same host) or whose heartbeat is older than the study's lease is closed as interrupted and
enqueued again, to run from scratch; after `max_attempts` such losses it is closed as failed.
The study's own settings (the resolved study file, the lease, the attempt limit) live in the
storage too, so a worker on another machine needs nothing but the storage URL.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import wraps
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text

from lorasweep.errors import StudyError
from lorasweep.records import TrialResult
from lorasweep.redact import redact_text
from lorasweep.space import TrialSpec
from lorasweep.study.backend import (
    JOURNAL_NAME,
    open_storage,
    optuna_study_id,
    optuna_trial_id,
    patiently,
)
from lorasweep.study.defaults import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PATIENCE_SECONDS,
)

LOCK_NAME = ".sync.lock"
LOST_REASON = "its worker stopped mid-trial"
CLAIM_SECONDS = 30.0
# The LR is recorded as an Optuna parameter too, so optuna-dashboard can plot it.
LR_DISTRIBUTION = FloatDistribution(1e-12, 1e3, log=True)
STUDY_TEXT_ATTR = "study_yaml"
TARGETS_ATTR = "target_layers"  # target set -> the layers it resolved to (Store.keep_targets)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claimed(NamedTuple):
    """A claimed trial: its Optuna id, its spec, and the step it starts from (a rung's, for a
    trial going on after search.stop_early paused it; else 0)."""

    trial_id: int
    spec: TrialSpec
    from_step: int = 0


@dataclass(frozen=True)
class Lease:
    """A running trial as `lorasweep status` shows it."""

    grid_id: int
    worker: str
    heartbeat_age: float  # seconds since the worker last renewed the lease
    lease_left: float  # seconds before others may take the trial over; <= 0: stale
    process_gone: bool  # the worker ran on this host and its process has ended
    stale: bool  # nobody works on it any more (Store._is_stale): the next worker reruns it


def _patient(method: Callable) -> Callable:
    """Retry the storage call through outages of up to the store's patience."""

    @wraps(method)
    def call(self: Store, *args, **kwargs):
        return patiently(lambda: method(self, *args, **kwargs), self.where, self.patience)

    return call


class Store:
    """One study's trials in Optuna, keyed by the trial key of the grid."""

    def __init__(self, study_dir: Path, study_name: str, maximize: bool, create: bool = True,
                 storage_url: str | None = None,
                 patience: float = DEFAULT_PATIENCE_SECONDS) -> None:
        """Open (or, with `create`, create) the study's store; reading never writes."""
        self.folder = study_dir
        self.url = storage_url
        self.patience = patience
        self.where = (f"--storage {redact_text(storage_url)}" if storage_url
                      else str(study_dir / JOURNAL_NAME))
        self.storage = open_storage(storage_url, study_dir, patience)
        self.optuna_study = self._open_study(study_name, maximize, create)
        self.study_id = optuna_study_id(self.optuna_study)
        self._lock_key = zlib.crc32(study_name.encode())

    @_patient
    def _open_study(self, name: str, maximize: bool, create: bool) -> optuna.Study:
        if create:
            return optuna.create_study(storage=self.storage, study_name=name, load_if_exists=True,
                                       direction="maximize" if maximize else "minimize")
        try:
            return optuna.load_study(storage=self.storage, study_name=name)
        except KeyError:
            raise StudyError(f"{self.where}: no study '{name}' there") from None

    @_patient
    def configure(self, study_text: str, lease_seconds: float | None = None,
                  max_attempts: int | None = None) -> None:
        """Record the resolved study file and the fault settings every worker follows."""
        self.storage.set_study_user_attr(self.study_id, STUDY_TEXT_ATTR, study_text)
        if lease_seconds is not None:
            self.storage.set_study_user_attr(self.study_id, "lease_seconds", lease_seconds)
        if max_attempts is not None:
            self.storage.set_study_user_attr(self.study_id, "max_attempts", max_attempts)

    @_patient
    def keep_targets(self, targets: dict[str, list[str]]) -> None:
        """Record the layers each target set resolves to at the first run or worker that sees
        it (studies started before this record get it then), and refuse a process that resolves
        one to other layers (a lorasweep or transformers that names or picks a model's layers
        differently), so a study never mixes two meanings of a target set. Recording is
        idempotent: workers that start together write the same thing."""
        recorded = self.settings().get(TARGETS_ATTR, {})
        for targets_text, layers in targets.items():
            before = recorded.get(targets_text)
            if before is not None and before != layers:
                raise StudyError(
                    f"target_modules '{targets_text}': this lorasweep adapts {len(layers)} "
                    f"layers where the study's trials adapted {len(before)} "
                    f"({_layer_change(before, layers)}); a study keeps one meaning of its "
                    "targets: run it with the lorasweep and transformers it was started with, "
                    "or start another --out")
        if any(targets_text not in recorded for targets_text in targets):
            self.storage.set_study_user_attr(self.study_id, TARGETS_ATTR,
                                             {**targets, **recorded})

    @_patient
    def settings(self) -> dict:
        return self.storage.get_study_user_attrs(self.study_id)

    @property
    def lease_seconds(self) -> float:
        return _lease(self.settings())

    def study_text(self) -> str:
        """The resolved study file the study was created with (for workers elsewhere)."""
        text_ = self.settings().get(STUDY_TEXT_ATTR)
        if text_ is None:
            name = self.optuna_study.study_name
            raise StudyError(f"{self.where}: the study '{name}' holds no study "
                             "file; start it with `lorasweep run STUDY.yaml --storage URL`")
        return str(text_)

    @_patient
    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    @_patient
    def sync(self, grid: list[TrialSpec], retry_failed: bool = False, go: Collection[str] = (),
             stop: Mapping[str, str] | None = None) -> int:
        """Enqueue grid trials not done, queued or running; requeue dead runs. Returns a count.

        A trial paused at a rung goes on (its next segment enqueued) when its key is in `go`,
        and is recorded as pruned, for the reason given, when it is in `stop`; otherwise it
        waits. A trial keeps the number it was first given; trials new to the store are numbered
        after the largest number it holds, so widening a grid never renumbers recorded trials. A
        lock serializes processes that sync one study at once (a file lock in the folder, or a
        PostgreSQL advisory lock when workers on many machines share a database).
        """
        with self._sync_lock():
            return self._sync(grid, retry_failed, go, stop or {})

    @contextmanager
    def _sync_lock(self) -> Iterator[None]:
        storage = self.storage
        if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
            with storage.engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._lock_key})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                       {"key": self._lock_key})
            return
        with open(self.folder / LOCK_NAME, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _sync(self, grid: list[TrialSpec], retry_failed: bool, go: Collection[str],
              stop: Mapping[str, str]) -> int:
        now = time.time()
        settings = self.settings()  # one read for both
        lease = _lease(settings)
        max_attempts = int(settings.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
        by_key: dict[str, list[FrozenTrial]] = {}
        numbers: dict[str, int] = {}
        for trial in self.trials():
            key = str(trial.user_attrs.get("trial_key"))
            by_key.setdefault(key, []).append(trial)
            numbers[key] = int(trial.user_attrs["grid_id"])
        next_number = max(numbers.values(), default=-1) + 1
        enqueued = 0
        for spec in grid:
            if spec.key not in numbers:
                numbers[spec.key], next_number = next_number, next_number + 1
            attempts = sorted(by_key.get(spec.key, []), key=lambda t: t.number)
            statuses = set()
            for trial in attempts:
                status = self._status(trial)
                if status == "running" and self._is_stale(trial, now, lease):
                    status = self._close_lost(trial, attempts, max_attempts)
                statuses.add(status)
            if statuses & {"complete", "diverged", "pruned", "waiting", "running"}:
                continue
            if "failed" in statuses and not retry_failed:
                continue
            numbered = replace(spec, grid_id=numbers[spec.key])
            attrs = numbered.to_attrs()
            if "paused" in statuses:
                paused = max((t for t in attempts if self._status(t) == "paused"),
                             key=lambda t: int(t.user_attrs["steps"]))
                if spec.key in stop:
                    self._add_pruned(paused, stop[spec.key])
                    continue
                if spec.key not in go:
                    continue  # its cell has not decided this rung yet
                attrs["from_step"] = int(paused.user_attrs["steps"])
            self.optuna_study.enqueue_trial({"lr": spec.lr}, user_attrs=attrs)
            enqueued += 1
        return enqueued

    def _add_pruned(self, paused: FrozenTrial, reason: str) -> None:
        """Record a trial stopped at the rung where it paused: a finished PRUNED copy of its
        paused segment (its curve, rungs and intermediate values) with status pruned."""
        self.optuna_study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED, params={"lr": float(paused.user_attrs["lr"])},
            distributions={"lr": LR_DISTRIBUTION},
            user_attrs={**paused.user_attrs, "status": "pruned", "reason": reason},
            intermediate_values=dict(paused.intermediate_values)))

    def _close_lost(self, trial: FrozenTrial, attempts: list[FrozenTrial],
                    max_attempts: int) -> str:
        """Close a trial whose worker died: interrupted (to run again), or failed for good."""
        losses = 1
        for earlier in attempts:
            if earlier.number >= trial.number:
                break
            status = self._status(earlier)
            losses = 1 if status == "failed" else losses + bool(earlier.user_attrs.get("lost"))
        trial_id = optuna_trial_id(trial)
        self.storage.set_trial_user_attr(trial_id, "lost", True)
        if losses >= max_attempts:
            self.record_failure(trial_id, f"{LOST_REASON} {losses} times (killed, frozen "
                                "or cut off); not run again: --retry-failed runs it")
            return "failed"
        self.record_failure(trial_id, LOST_REASON, status="interrupted")
        return "interrupted"

    @staticmethod
    def _is_stale(trial: FrozenTrial, now: float, lease: float) -> bool:
        """A RUNNING trial nobody works on: its process is gone or its lease ran out."""
        return (_process_gone(trial) or _lease_left(trial, now, lease) <= 0
                or _cut_off_in_claim(trial, now))

    @_patient
    def claim_group(self, max_group: int) -> list[Claimed]:
        """Claim up to `max_group` waiting trials of one fusable group (one cell and seed, and
        starting from one step), oldest group first."""
        claimed: list[Claimed] = []
        group = None
        for trial in self.storage.get_all_trials(self.study_id, deepcopy=False,
                                                 states=(TrialState.WAITING,)):
            spec = TrialSpec.from_attrs(trial.user_attrs)
            from_step = int(trial.user_attrs.get("from_step", 0))
            if group is not None and (spec.group_key, from_step) != group:
                continue
            trial_id = optuna_trial_id(trial)
            if not self._claim(trial_id, spec.lr):
                continue
            group = (spec.group_key, from_step)
            claimed.append(Claimed(trial_id, spec, from_step))
            if len(claimed) == max_group or not spec.cell.fusable:
                break
        return claimed

    def _claim(self, trial_id: int, lr: float) -> bool:
        try:
            won = self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        if won:
            self.storage.set_trial_user_attr(trial_id, "worker", worker_id())
            self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            self.storage.set_trial_param(trial_id, "lr", lr, LR_DISTRIBUTION)
        return won

    @_patient
    def heartbeat(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())

    @_patient
    def release(self, trial_id: int) -> None:
        """End this worker's lease on a trial now (it was stopped mid-trial): the next worker
        that looks closes it as lost, a loss toward max_attempts like any other, and runs it
        again, without waiting for the lease to run out."""
        if self.still_ours(trial_id):
            self.storage.set_trial_user_attr(trial_id, "heartbeat", 0.0)

    @_patient
    def still_ours(self, trial_id: int) -> bool:
        """False when another process declared this trial dead and closed it meanwhile."""
        trial = self.storage.get_trial(trial_id)
        return trial.state == TrialState.RUNNING and trial.user_attrs.get("worker") == worker_id()

    @_patient
    def record(self, trial_id: int, result: TrialResult, metric_name: str) -> bool:
        """Store a finished trial (COMPLETE with its metric, or PRUNED when it diverged) or a
        segment paused at a rung (FAIL with status paused: the trial itself goes on, or stops,
        as the plan decides).

        Returns False when the trial was closed by someone else first (its lease was taken
        over): the trial then counts once, from its rerun.
        """
        try:
            for name, value in _attrs(result).items():
                self.storage.set_trial_user_attr(trial_id, name, _jsonable(value))
            for prefix, values in (("val_", result.metrics), ("test_", result.test)):
                for name, value in values.items():
                    self.storage.set_trial_user_attr(trial_id, prefix + name, _jsonable(value))
            for rung in result.rungs:  # as Optuna's intermediate values (optuna-dashboard)
                if math.isfinite(rung.get(metric_name, math.nan)):
                    self.storage.set_trial_intermediate_value(trial_id, rung["step"],
                                                              rung[metric_name])
            # straight to the storage (as Study.tell would), which refuses a closed trial
            if result.status == "complete":
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE,
                                                    [result.metrics[metric_name]])
            elif result.status == "paused":
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            else:
                self.storage.set_trial_state_values(trial_id, TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            # a retry after an outage lands here when the first try had gone through
            trial = self.storage.get_trial(trial_id)
            return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                    and trial.user_attrs.get("status") == result.status
                    and trial.user_attrs.get("worker") == worker_id())
        return True

    @_patient
    def recorded(self, trial_id: int) -> tuple[str, FrozenTrial]:
        """A trial's status and record as the store holds them now (what a tracker logs)."""
        trial = self.storage.get_trial(trial_id)
        return self._status(trial), trial

    @_patient
    def record_failure(self, trial_id: int, reason: str, status: str = "failed") -> None:
        """Close a trial as FAIL: `failed` (it crashed) or `interrupted` (it will run again)."""
        try:
            self.storage.set_trial_user_attr(trial_id, "status", status)
            self.storage.set_trial_user_attr(trial_id, "reason", reason)
            self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # already closed (by its worker, or by a process that found it dead)

    @staticmethod
    def _status(trial: FrozenTrial) -> str:
        """The trial's status, from its Optuna state first, so no half-written record misleads."""
        if trial.state == TrialState.WAITING:
            return "waiting"
        if trial.state == TrialState.RUNNING:
            return "running"
        if trial.state == TrialState.COMPLETE:
            return "complete"
        status = trial.user_attrs.get("status")
        if trial.state == TrialState.PRUNED:
            return "pruned" if status == "pruned" else "diverged"
        return status if status in ("failed", "paused") else "interrupted"

    def latest_by_key(self) -> dict[str, tuple[str, FrozenTrial, int]]:
        """Per trial key: its status, the attempt that decides it, and how many attempts ran:
        the runs lost or failed, and the one that decides (a segment paused at a rung, or the
        next segment, is part of an attempt, not one of its own)."""
        rank = {"complete": 0, "diverged": 0, "pruned": 0, "running": 1, "waiting": 2,
                "paused": 3, "failed": 4, "interrupted": 5}
        latest: dict[str, tuple[str, FrozenTrial]] = {}
        lost: dict[str, int] = {}
        for trial in self.trials():
            key = str(trial.user_attrs.get("trial_key"))
            status = self._status(trial)
            lost[key] = lost.get(key, 0) + (status in ("failed", "interrupted"))
            if key not in latest or rank[status] <= rank[latest[key][0]]:
                latest[key] = (status, trial)
        return {key: (status, trial, lost[key] + (status not in ("failed", "interrupted")))
                for key, (status, trial) in latest.items()}

    def leases(self) -> list[Lease]:
        """The running trials, with who runs them and how fresh their lease is."""
        now, lease = time.time(), self.lease_seconds
        return [Lease(grid_id=int(t.user_attrs["grid_id"]),
                      worker=str(t.user_attrs.get("worker", "?")),
                      heartbeat_age=now - _heartbeat(t, now),
                      lease_left=_lease_left(t, now, lease), process_gone=_process_gone(t),
                      stale=self._is_stale(t, now, lease))
                for t in self.trials(states=(TrialState.RUNNING,))]

    def others_running(self) -> bool:
        """Whether trials run in other processes (which may still die and need taking over)."""
        return any(t.user_attrs.get("worker") != worker_id()
                   for t in self.trials(states=(TrialState.RUNNING,)))


def _layer_change(before: list[str], after: list[str]) -> str:
    """What a target set gained and lost, a few names of each."""
    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    added, dropped = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    parts = ([f"now also {few(added)}"] if added else []) + \
        ([f"no longer {few(dropped)}"] if dropped else [])
    return "; ".join(parts) or "the same layers in another order"


def _lease(settings: dict) -> float:
    return float(settings.get("lease_seconds", DEFAULT_LEASE_SECONDS))


def _heartbeat(trial: FrozenTrial, now: float) -> float:
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return float(trial.user_attrs.get("heartbeat", started))


def _lease_left(trial: FrozenTrial, now: float, lease: float) -> float:
    return _heartbeat(trial, now) + lease - now


def _cut_off_in_claim(trial: FrozenTrial, now: float) -> bool:
    """A claim moves the trial to RUNNING, then names its worker a moment later; a worker killed
    in between leaves a trial nobody can own. Such a trial is stale once CLAIM_SECONDS pass."""
    return "worker" not in trial.user_attrs and now - _heartbeat(trial, now) > CLAIM_SECONDS


def _process_gone(trial: FrozenTrial) -> bool:
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _attrs(result: TrialResult) -> dict:
    """A result's fields as user attributes: all but the metrics (stored one by one), the
    weights and a checkpoint (files of the study folder)."""
    return {f.name: getattr(result, f.name) for f in fields(result)
            if f.name not in ("metrics", "test", "weights", "checkpoint")}


def _jsonable(value: object) -> object:
    """Optuna user attributes must be JSON, which has no NaN or inf: those become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
