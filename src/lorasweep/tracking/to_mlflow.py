"""Trials as MLflow runs: one experiment per study, one run per trial, in MLflow's local sqlite
store inside the study folder unless a tracking URI is given.

MLflow's own default (since 3.7) is `sqlite:///mlflow.db` in the working folder; a study keeps
its runs beside its other files instead (`mlflow ui --backend-store-uri
sqlite:///STUDY_FOLDER/mlflow/mlflow.db` shows them). The trial's key is set last, so a run cut
off half-way carries no key and the trial is logged again whole.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lorasweep.errors import StudyError, first_line
from lorasweep.redact import redact_text
from lorasweep.tracking.trial import KEY_TAG, TrackedTrial

LOCAL_DIR = "mlflow"  # in the study folder: mlflow.db and the experiment's artifacts
BATCH = 1000  # MLflow's most metrics in one log_batch


def tracking_uri(folder: Path, given: str | None) -> str:
    """The study file's URI, else $MLFLOW_TRACKING_URI, else the study folder's sqlite store."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    local = folder.resolve() / LOCAL_DIR
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


class MlflowTracker:
    """The study's MLflow experiment (created at the first run that tracks it)."""

    def __init__(self, study: str, folder: Path, uri: str | None) -> None:
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # their table set-up reports, line by line (after
            logging.getLogger(name).setLevel(logging.WARNING)  # mlflow's import sets its own)

        self.uri = tracking_uri(folder, uri)
        self.label = f"MLflow at {redact_text(self.uri)} (experiment {study})"
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(study)
            if experiment is None:
                artifacts = ((folder.resolve() / LOCAL_DIR / "artifacts").as_uri()
                             if self.uri.startswith("sqlite:") else None)
                self.experiment_id = self.client.create_experiment(
                    study, artifact_location=artifacts)
            else:
                self.experiment_id = experiment.experiment_id
        except Exception as exc:
            raise StudyError(f"track.mlflow_uri {redact_text(self.uri)}: cannot open "
                             f"({redact_text(first_line(exc))})") from None

    def logged(self) -> set[str]:
        keys: set[str] = set()
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000,
                                           page_token=token)
            keys.update(run.data.tags[KEY_TAG] for run in page if KEY_TAG in run.data.tags)
            token = page.token
            if not token:
                return keys

    def log(self, trial: TrackedTrial) -> None:
        from mlflow.entities import Metric, Param

        run = self.client.create_run(
            self.experiment_id, run_name=trial.name,
            tags={"lorasweep.cell": trial.cell, "lorasweep.status": trial.status})
        run_id = run.info.run_id
        stamp = run.info.start_time
        metrics = [Metric(name, value, stamp, step) for name, points in trial.curves.items()
                   for step, value in points]
        metrics += [Metric(name, value, stamp, trial.steps)
                    for name, value in trial.metrics.items()]
        params = [Param(name, str(value)) for name, value in trial.params.items()]
        self.client.log_batch(run_id, params=params)
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        self.client.set_tag(run_id, KEY_TAG, trial.key)  # last: a run cut off carries no key
        self.client.set_terminated(run_id, "FINISHED")
