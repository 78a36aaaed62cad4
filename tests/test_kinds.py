"""Adding a task kind is one registration: a `Kind` row in kinds.KINDS and a builder in the
kind's own file. The toy kind here (its row below, its builder in this file) reaches the study
file's validation, the task builder, the model loading, training, the report's metric and
`lorasweep curvature` with no other edit."""

from __future__ import annotations

import pytest

from lorasweep.cli import main
from lorasweep.config import Study, load_study
from lorasweep.errors import StudyError
from lorasweep.kinds import KINDS, Kind
from lorasweep.models import load_preprocessor
from lorasweep.tasks import build_task
from lorasweep.tasks.classification import ClassificationTask, build_classification
from lorasweep.tasks.data import RawSplits

from .conftest import read_rows

# Classification of each text read backwards; optima chosen on the validation loss by default.
TOY = Kind("toy", ("eval_loss", "accuracy"), "tests.test_kinds:build_toy",
           model="AutoModelForSequenceClassification", labels=True, peft_task_type="SEQ_CLS",
           no_curvature="a toy kind has no curvature to measure")


def build_toy(study: Study, raw: RawSplits, tokenizer, seq_len: int) -> ClassificationTask:
    """The toy kind's builder: classification, on the texts reversed."""
    field = study.task.text_field

    def backwards(records: list[dict] | None) -> list[dict] | None:
        return None if records is None else [{**r, field: r[field][::-1]} for r in records]

    reversed_raw = RawSplits(backwards(raw.train), backwards(raw.validation),
                             backwards(raw.test), raw.stored)
    return build_classification(study, reversed_raw, tokenizer, seq_len)


def toy_study(study_file):
    return study_file(task={"kind": "toy"}, train={"steps": 4},
                      search={"methods": ["lora"], "ranks": [4], "lr": [3e-3]})


def test_an_unregistered_kind_is_refused(study_file):
    with pytest.raises(StudyError, match=r"task\.kind: Input should be 'classification'.*'rl'"):
        load_study(toy_study(study_file))


def test_a_registered_kind_validates_builds_and_trains(monkeypatch, study_file, tmp_path,
                                                       capsys):
    monkeypatch.setitem(KINDS, "toy", TOY)
    path = toy_study(study_file)
    study = load_study(path)
    assert (study.task.objective, study.task.maximize) == ("eval_loss", False)
    with pytest.raises(StudyError, match=r"task\.metric 'f1': a toy task reports eval_loss, "
                                         "accuracy"):
        load_study(path, ["task.metric=f1"])

    task = build_task(study, load_preprocessor(study.model, "toy"))
    assert isinstance(task, ClassificationTask) and task.label_names

    folder = tmp_path / "study"
    assert main(["run", str(path), "--out", str(folder)]) == 0
    [row] = read_rows(folder)
    assert row["status"] == "complete"
    assert float(row["metric"]) == float(row["eval_loss"]) > 0

    capsys.readouterr()
    assert main(["curvature", str(folder)]) == 2
    assert capsys.readouterr().err.strip().endswith("a toy kind has no curvature to measure")
