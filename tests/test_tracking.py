"""`track:` each finished trial logged once as a run, to a real MLflow store (its local sqlite
store in the study folder) and trackio's local mode, with the numbers trials.csv has; through a
kill, a run lost from the tracker, and a resume. A tracker not installed, or a field
that is wrong, is one line before any trial is claimed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lorasweep import optional
from lorasweep.tracking import Tracking
from lorasweep.tracking.trial import KEY_TAG, TrackedTrial

from .conftest import kill_mid_run, read_rows, refused, tiny_study, write_study

NUMBERS = ("train_loss", "eval_loss", "metric", "test_metric", "steps", "seconds",
           "trainable_params")
READ_TRACKIO = """import json, sys
from trackio.sqlite_storage import SQLiteStorage as S
project = sys.argv[1]
print(json.dumps([{"config": S.get_run_config(project, name), "logs": S.get_logs(project, name)}
                  for name in S.get_runs(project)]))"""


def run_lorasweep(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lorasweep.cli", *args], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)


def mlflow_runs(folder: Path, study: str) -> dict[str, object]:
    """The study's active MLflow runs by trial key (a key logged twice fails here)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{folder.resolve()}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id])
    keys = [run.data.tags[KEY_TAG] for run in runs]
    assert len(keys) == len(set(keys)), keys
    return dict(zip(keys, runs, strict=True))


def trackio_runs(study: str) -> dict[str, dict]:
    """The study's trackio runs by trial key: config and final logged values."""
    found = json.loads(subprocess.run([sys.executable, "-c", READ_TRACKIO, study], check=True,
                                      capture_output=True, text=True).stdout)
    keys = [run["config"]["lorasweep_trial_key"] for run in found]
    assert len(keys) == len(set(keys)), keys
    return {run["config"]["lorasweep_trial_key"]: {**run["config"], **run["logs"][-1]}
            for run in found}


def same(logged: float, written: str) -> bool:
    return math.isclose(float(logged), float(written), rel_tol=1e-12)


def test_each_finished_trial_is_one_run_with_trials_csv_numbers_through_kill_and_resume(
        tmp_path: Path, data_files: dict[str, Path], monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tiny_study(data_files, search={"methods": ["lora"], "lr": [1e-3, 1e-2, 3e-2]})
    study["track"] = ["mlflow", "trackio"]
    path = write_study(tmp_path / "study.yaml", study)
    out = tmp_path / "out"
    command = ["run", str(path), "--out", str(out), "--threads", "1"]
    kill_mid_run(command, out, "tiny", complete=1, running=1)
    # a run lost from the tracker (as a kill between a trial's record and its log leaves it):
    # the resume logs it again, once, and nothing else twice
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow/mlflow.db")
    before = mlflow_runs(out, "tiny")
    assert len(before) <= 1
    for run in before.values():
        client.delete_run(run.info.run_id)
    run_lorasweep(*command)  # resumes: the killed trial reruns, the rest train
    rows = {row["trial"]: row for row in read_rows(out)}
    assert len(rows) == 3 and all(row["status"] == "complete" for row in rows.values())
    by_key = mlflow_runs(out, "tiny")
    trackio = trackio_runs("tiny")
    assert len(by_key) == len(trackio) == 3
    assert not {run.info.run_id for run in before.values()} & \
        {run.info.run_id for run in by_key.values()}
    for run in by_key.values():
        row = rows[run.data.params["trial"]]
        assert same(run.data.params["lr"], row["lr"]) and run.data.params["seed"] == row["seed"]
        assert run.data.params["method"] == row["method"]
        assert run.info.run_name == f"lora r=4 a=2r lr={float(row['lr']):.3g} seed=0"
        for name in NUMBERS:
            assert same(run.data.metrics[name], row[name]), (name, run.data.metrics, row)
        history = client.get_metric_history(run.info.run_id, "curve/loss")
        assert [point.step for point in history] == list(range(1, 13))  # each step's loss
        logged = trackio[run.data.tags[KEY_TAG]]
        assert str(logged["trial"]) == row["trial"]
        for name in NUMBERS:
            assert same(logged[name], row[name]), (name, logged, row)


def test_a_tracker_not_installed_is_one_line_before_anything_runs(
        tmp_path: Path, data_files: dict[str, Path], monkeypatch, capsys):
    monkeypatch.setattr(optional, "installed", lambda module: module != "trackio")
    study = tiny_study(data_files)
    study["track"] = {"report_to": ["mlflow", "trackio"]}
    err = refused(tmp_path, study, capsys)
    assert "track.report_to: trackio" in err and "pip install trackio" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("track", "words"), [
    (["mlflow", "mlflow"], "track.report_to: 'mlflow' is named twice"),
    (["neptune"], "track.report_to"),
    ({"report_to": ["mlflow"], "mlflow_uri": "https://me:hunter2@mlflow.example/"},
     "track.mlflow_uri https://me:***@mlflow.example/: holds a secret"),
    ({"report_to": ["mlflow"], "uri": "x"}, "track.uri"),
])
def test_bad_track_field_is_one_line(tmp_path: Path, data_files: dict[str, Path], capsys,
                                     track: object, words: str):
    study = tiny_study(data_files)
    study["track"] = track
    err = refused(tmp_path, study, capsys)
    assert words in err and "hunter2" not in err, err


class Flaky:
    """A tracker that fails once, then logs."""

    label = "flaky"

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.failed = False

    def logged(self) -> set[str]:
        return set(self.runs)

    def log(self, trial: TrackedTrial) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("server down")
        self.runs.append(trial.key)


def test_a_tracker_outage_is_one_line_and_each_trial_is_logged_once(tmp_path: Path, capsys):
    trial = TrackedTrial(key="k", name="lora lr=0.001 seed=0", cell="lora", status="complete",
                         steps=3, params={"lr": 1e-3}, metrics={"metric": 0.5})
    other = TrackedTrial(**{**trial.__dict__, "key": "k2"})
    tracker = Flaky()
    tracking = Tracking([tracker], tmp_path)
    tracking.log([trial])
    assert "flaky: could not log trials (ConnectionError: server down)" in capsys.readouterr().out
    for _ in range(2):  # the next catch-up logs it; later ones find it there
        tracking.log([trial, other, trial])
    assert tracker.runs == ["k", "k2"]


def test_trackio_is_local_only(tmp_path: Path, data_files: dict[str, Path], monkeypatch,
                               capsys):
    monkeypatch.setenv("TRACKIO_SERVER_URL", "https://host/?write_token=hunter2")
    study = tiny_study(data_files)
    study["track"] = ["trackio"]
    err = refused(tmp_path, study, capsys)
    assert "$TRACKIO_SERVER_URL" in err and "hunter2" not in err, err
    assert not (tmp_path / "out").exists()  # before anything is written
