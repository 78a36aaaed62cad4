"""The study's records, kept in an Optuna storage (a journal file inside the study folder).

Every trial of the grid is enqueued once as a WAITING Optuna trial carrying its spec in user
attributes. A worker claims trials by moving them WAITING -> RUNNING through the storage, which
succeeds for exactly one process, so no trial is trained twice. Outcomes map onto Optuna states:
complete -> COMPLETE (value = the metric), diverged -> PRUNED, failed or interrupted -> FAIL.
A RUNNING trial whose worker died is marked interrupted and enqueued again, to run from scratch.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from lorasweep.errors import StudyError
from lorasweep.space import TrialSpec
from lorasweep.train import TrialResult

JOURNAL_NAME = "optuna.journal"
LOCK_NAME = ".sync.lock"
LEASE_SECONDS = 180.0  # a running trial whose heartbeat is older than this is presumed dead
LR_BOUNDS = (1e-12, 1e3)  # the Optuna distribution the LR param is recorded under

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


def is_stale(trial: FrozenTrial, now: float) -> bool:
    """A RUNNING trial nobody is working on: its process is gone or its heartbeat stopped."""
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - float(trial.user_attrs.get("heartbeat", started)) > LEASE_SECONDS


class Store:
    """One study's trials in Optuna, keyed by the trial key of the grid."""

    def __init__(self, study_dir: Path, study_name: str, maximize: bool,
                 create: bool = True) -> None:
        """Open (or, with `create`, create) the study's store; reading never writes."""
        self.folder = study_dir
        journal = study_dir / JOURNAL_NAME
        self.storage = JournalStorage(JournalFileBackend(str(journal)))
        if create:
            self.study = optuna.create_study(
                storage=self.storage, study_name=study_name, load_if_exists=True,
                direction="maximize" if maximize else "minimize")
        else:
            try:
                self.study = optuna.load_study(storage=self.storage, study_name=study_name)
            except KeyError:
                raise StudyError(f"{study_dir}: no study '{study_name}' in its journal") from None
        self.study_id = self.study._study_id

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    def sync(self, grid: list[TrialSpec], retry_failed: bool = False) -> int:
        """Enqueue grid trials not done, queued or running; requeue dead runs. Returns a count.

        A trial keeps the number it was first given; trials new to the store are numbered after
        the largest number it holds, so widening a grid never renumbers recorded trials. A lock
        file serializes processes that sync the same folder at once.
        """
        with open(self.folder / LOCK_NAME, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._sync(grid, retry_failed)

    def _sync(self, grid: list[TrialSpec], retry_failed: bool) -> int:
        now = time.time()
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
            statuses = set()
            for trial in by_key.get(spec.key, []):
                status = self._status(trial)
                if status == "running" and is_stale(trial, now):
                    self.record_failure(trial._trial_id, "its worker stopped mid-trial",
                                        status="interrupted")
                    status = "interrupted"
                statuses.add(status)
            if statuses & {"complete", "diverged", "waiting", "running"}:
                continue
            if "failed" in statuses and not retry_failed:
                continue
            numbered = replace(spec, grid_id=numbers[spec.key])
            self.study.enqueue_trial({"lr": spec.lr}, user_attrs=numbered.to_attrs())
            enqueued += 1
        return enqueued

    def claim_group(self, max_group: int) -> list[tuple[int, TrialSpec]]:
        """Claim up to `max_group` waiting trials of one fusable group, oldest group first."""
        claimed: list[tuple[int, TrialSpec]] = []
        group_key = None
        for trial in self.trials(states=(TrialState.WAITING,)):
            spec = TrialSpec.from_attrs(trial.user_attrs)
            if group_key is not None and spec.group_key != group_key:
                continue
            if not self._claim(trial._trial_id):
                continue
            group_key = spec.group_key
            claimed.append((trial._trial_id, spec))
            if len(claimed) == max_group or not spec.cell.fusable:
                break
        return claimed

    def _claim(self, trial_id: int) -> bool:
        try:
            won = self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        if won:
            trial = optuna.Trial(self.study, trial_id)
            trial.suggest_float("lr", *LR_BOUNDS, log=True)
            self.storage.set_trial_user_attr(trial_id, "worker", worker_id())
            self.heartbeat(trial_id)
        return won

    def heartbeat(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())

    def still_ours(self, trial_id: int) -> bool:
        """False when another process declared this trial dead and closed it meanwhile."""
        trial = self.storage.get_trial(trial_id)
        return trial.state == TrialState.RUNNING and trial.user_attrs.get("worker") == worker_id()

    def record(self, trial_id: int, result: TrialResult, metric_name: str) -> None:
        """Store a finished trial: COMPLETE with its metric, or PRUNED when it diverged."""
        attrs = asdict(result)
        for name, value in attrs.items():
            if name not in ("metrics", "test", "weights"):
                self.storage.set_trial_user_attr(trial_id, name, _jsonable(value))
        for prefix, values in (("val_", result.metrics), ("test_", result.test)):
            for name, value in values.items():
                self.storage.set_trial_user_attr(trial_id, prefix + name, _jsonable(value))
        number = self.storage.get_trial(trial_id).number
        if result.status == "complete":
            self.study.tell(number, result.metrics[metric_name])
        else:
            self.study.tell(number, state=TrialState.PRUNED)

    def record_failure(self, trial_id: int, reason: str, status: str = "failed") -> None:
        """Close a trial as FAIL: `failed` (it crashed) or `interrupted` (it will run again)."""
        self.storage.set_trial_user_attr(trial_id, "status", status)
        self.storage.set_trial_user_attr(trial_id, "reason", reason)
        self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)

    @staticmethod
    def _status(trial: FrozenTrial) -> str:
        if trial.state == TrialState.WAITING:
            return "waiting"
        if trial.state == TrialState.RUNNING:
            return "running"
        return str(trial.user_attrs.get("status", trial.state.name.lower()))

    def latest_by_key(self) -> dict[str, tuple[str, FrozenTrial, int]]:
        """Per trial key: its status, the attempt that decides it, and how many attempts ran."""
        rank = {"complete": 0, "diverged": 0, "running": 1, "waiting": 2, "failed": 3,
                "interrupted": 4}
        out: dict[str, tuple[str, FrozenTrial, int]] = {}
        for trial in self.trials():
            key = str(trial.user_attrs.get("trial_key"))
            status = self._status(trial)
            count = out[key][2] + 1 if key in out else 1
            if key not in out or rank.get(status, 5) <= rank.get(out[key][0], 5):
                out[key] = (status, trial, count)
            else:
                out[key] = (out[key][0], out[key][1], count)
        return out


def _jsonable(value: object) -> object:
    """Optuna user attributes must be JSON, which has no NaN or inf: those become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
