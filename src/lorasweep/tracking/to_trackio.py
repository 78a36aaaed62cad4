"""Trials as trackio runs in its local store: one project per study, one run per trial, its
cell as the run's group.

trackio keeps projects in TRACKIO_DIR (default ~/.cache/huggingface/trackio), where `trackio
show --project STUDY` finds them. A run's config holds the trial's key, read back to log each
trial once.
"""

from __future__ import annotations

import contextlib
import io
import os

from lorasweep.errors import StudyError
from lorasweep.tracking.trial import TrackedTrial

KEY_FIELD = "lorasweep_trial_key"
# trackio's settings that send runs elsewhere than its local store, where lorasweep checks that
# a trial is logged once
REMOTE_ENV = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL")


def check_local() -> None:
    """Refuse trackio's settings that would send runs away from its local store (named, never
    shown: a server URL may carry a write token)."""
    for name in REMOTE_ENV:
        if os.environ.get(name):
            raise StudyError(f"track.report_to: trackio: logs to trackio's local store only "
                             f"(it checks there that each trial is logged once), but ${name} "
                             "sends runs elsewhere; unset it, and sync the project later")


class TrackioTracker:
    """The study's trackio project, in trackio's local store."""

    def __init__(self, study: str) -> None:
        check_local()
        import trackio.utils

        self.project = study
        self.label = f"trackio at {trackio.utils.TRACKIO_DIR} (project {study})"

    def logged(self) -> set[str]:
        from trackio.sqlite_storage import SQLiteStorage

        configs = SQLiteStorage.get_all_run_configs(self.project)
        return {str(config[KEY_FIELD]) for config in (configs or {}).values()
                if config and KEY_FIELD in config}

    def log(self, trial: TrackedTrial) -> None:
        import trackio

        # trackio prints where it logs and how to view it for every run: kept off the output
        with contextlib.redirect_stdout(io.StringIO()):
            trackio.init(project=self.project, name=trial.name, group=trial.cell,
                         config={**trial.params, "status": trial.status, KEY_FIELD: trial.key},
                         embed=False, auto_log_gpu=False, auto_log_cpu=False)
            try:
                by_step: dict[int, dict[str, float]] = {}
                for name, points in trial.curves.items():
                    for step, value in points:
                        by_step.setdefault(step, {})[name] = value
                for step in sorted(by_step):
                    trackio.log(by_step[step], step=step)
                trackio.log(dict(trial.metrics), step=max(trial.steps, max(by_step, default=0)))
            finally:
                trackio.finish()
