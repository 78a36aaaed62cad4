"""What `track:` costs: a finished study's trials logged again to fresh MLflow and trackio
stores, timed per trial (the check that a trial is not there yet included), and a catch-up that
finds every trial logged. docs/watching.md quotes it.

    python benchmarks/tracking_cost.py STUDY_FOLDER OUT_FOLDER   # TRACKIO_DIR=... for trackio
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lorasweep.records import trial_row
from lorasweep.study.folder import open_for_reading
from lorasweep.tracking import FINISHED, Tracking, tracked_trial
from lorasweep.tracking.to_mlflow import MlflowTracker
from lorasweep.tracking.to_trackio import TrackioTracker


def main(source: Path, out: Path) -> None:
    study, store = open_for_reading(source)
    runs = [tracked_trial(trial_row(status, trial, study.task.objective), trial.user_attrs)
            for status, trial, _ in store.latest_by_key().values() if status in FINISHED]
    out.mkdir(parents=True)
    started = time.perf_counter()
    mlflow = MlflowTracker(f"{study.name}-cost", out, None)
    print(f"MLflow: a new sqlite store opened in {time.perf_counter() - started:.1f} s")
    for tracker in (mlflow, TrackioTracker(f"{study.name}-cost")):
        tracking = Tracking([tracker], out)
        started = time.perf_counter()
        for run in runs:
            tracking.log([run])
        each = (time.perf_counter() - started) / len(runs)
        started = time.perf_counter()
        tracking.log(runs)
        again = time.perf_counter() - started
        print(f"{tracker.label}: {each * 1000:.0f} ms per trial ({len(runs)} trials); a "
              f"catch-up finding all logged {again * 1000:.0f} ms")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
