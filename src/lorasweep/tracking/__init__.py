"""Each finished trial also logged as a run to the experiment trackers a study names (`track:`),
for those who follow their work in MLflow or trackio.

The trackers are optional packages found at run time (`lorasweep.optional`), checked before any
trial is claimed. A run holds what trials.csv holds of its trial (the same row, `trial_row`),
its training curves by step, and the trial's key as a tag: a trial is logged once, whoever
records it and however often (a killed run resumed, a record retried after an outage, the catch
up at the start and end of `lorasweep run` that logs what a kill left out). The check and the log
happen under one lock file in the study folder, so local workers never log a trial twice. A
tracker that fails mid-study costs one warning line, not the study: the next catch-up logs what
it missed.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from lorasweep.config import Study
from lorasweep.optional import require
from lorasweep.tracking.trial import TrackedTrial, tracked_trial

__all__ = ["FINISHED", "Tracker", "Tracking", "check_tracking", "open_tracking",
           "tracked_trial"]

LOCK_NAME = ".track.lock"
FINISHED = ("complete", "diverged", "pruned")  # statuses a tracker gets (not failed or paused)
# each tracker: (module to find, package to pip install)
PACKAGES = {"mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


class Tracker(Protocol):
    """One tracker's side: which trial keys it holds, and logging one trial as a run."""

    label: str  # how a message names it

    def logged(self) -> set[str]: ...

    def log(self, trial: TrackedTrial) -> None: ...


def check_tracking(study: Study) -> None:
    """Refuse, in one line naming the field and the pip command, a tracker not installed here;
    before anything runs."""
    for name in study.track.report_to if study.track else ():
        module, package = PACKAGES[name]
        require(module, package, f"track.report_to: {name}")
        if name == "trackio":
            from lorasweep.tracking.to_trackio import check_local

            check_local()


class Tracking:
    """The study's trackers, each finished trial logged once to each."""

    def __init__(self, trackers: list[Tracker], folder: Path) -> None:
        self.trackers = trackers
        self.folder = folder

    def log(self, trials: list[TrackedTrial]) -> None:
        """Log the trials each tracker does not hold yet; a tracker's failure is one line."""
        if not trials:
            return
        with folder_lock(self.folder):
            for tracker in self.trackers:
                try:
                    held = tracker.logged()
                    for trial in trials:
                        if trial.key not in held:
                            tracker.log(trial)
                            held.add(trial.key)
                except Exception as exc:  # a tracker's outage must not end a study
                    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    tqdm.write(f"lorasweep: {tracker.label}: could not log trials ({message});"
                               " the next `lorasweep run` logs them")


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Held by the process that checks and logs (or creates an experiment) for the folder."""
    with open(folder / LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def open_tracking(study: Study, folder: Path) -> Tracking | None:
    """The study's trackers, opened (None when it names none); one line says where runs go."""
    if study.track is None:
        return None
    check_tracking(study)
    trackers: list[Tracker] = []
    with folder_lock(folder):  # workers starting together create one experiment
        for name in study.track.report_to:
            if name == "mlflow":
                from lorasweep.tracking.to_mlflow import MlflowTracker

                trackers.append(MlflowTracker(study.name, folder, study.track.mlflow_uri))
            else:
                from lorasweep.tracking.to_trackio import TrackioTracker

                trackers.append(TrackioTracker(study.name))
    tqdm.write("lorasweep: each finished trial is also logged to "
               + " and ".join(tracker.label for tracker in trackers))
    return Tracking(trackers, folder)
