"""Raw examples from the built-in data, local files or the hub, and the validation split.

Optima are chosen on a validation split carved from the training data with the study seed, so
every trial sees the same split and the test split is never used to choose anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from lorasweep.config import TaskSpec
from lorasweep.errors import StudyError
from lorasweep.tasks import packaged_data

BUILTIN_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_DATASETS = {"builtin:shakespeare-genre": "shakespeare_genre"}
# Built-in datasets read from pip packages: (train, test) records.
PACKAGED_DATASETS = {"builtin:gsm8k": packaged_data.gsm8k}
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}

Records = list[dict]


@dataclass
class RawSplits:
    train: Records
    validation: Records
    test: Records | None


def load_splits(task: TaskSpec, seed: int) -> RawSplits:
    """Train, validation (carved from train) and test records for a task."""
    train, test = _load_train_test(task)
    if not train:
        raise StudyError("task: the training data has no examples")
    order = np.random.default_rng(seed).permutation(len(train))
    size = task.validation_size
    n_val = int(size) if size >= 1 else max(1, round(len(train) * size))
    if task.max_eval_examples is not None:  # held-out examples beyond the cap go to training
        n_val = min(n_val, task.max_eval_examples)
    if n_val >= len(train):
        raise StudyError(f"task.validation_size: {size} leaves no training examples "
                         f"(the training data has {len(train)})")
    validation = [train[i] for i in order[:n_val]]
    # The rest in shuffled order, so a smaller max_train_examples is a prefix of a larger one.
    rest = [train[i] for i in order[n_val:]]
    if task.max_train_examples is not None:
        rest = rest[:task.max_train_examples]
    if task.max_eval_examples is not None and test is not None:
        test = test[:task.max_eval_examples]
    return RawSplits(train=rest, validation=validation, test=test)


def _load_train_test(task: TaskSpec) -> tuple[Records, Records | None]:
    if task.train_file is not None:
        train = _load_file(task.train_file, "task.train_file")
        test = None if task.test_file is None else _load_file(task.test_file, "task.test_file")
        return train, test
    assert task.dataset is not None
    if task.dataset in PACKAGED_DATASETS:
        return PACKAGED_DATASETS[task.dataset]()
    if task.dataset.startswith("builtin:"):
        if task.dataset not in BUILTIN_DATASETS:
            raise StudyError(f"task.dataset: unknown '{task.dataset}'; built-in datasets: "
                             f"{', '.join([*BUILTIN_DATASETS, *PACKAGED_DATASETS])}")
        folder = BUILTIN_DATA_DIR / BUILTIN_DATASETS[task.dataset]
        return (_load_file(str(folder / "train.jsonl"), "task.dataset"),
                _load_file(str(folder / "test.jsonl"), "task.dataset"))
    if Path(task.dataset).is_file():
        return _load_file(task.dataset, "task.dataset"), None
    return _load_named(task)


def _load_file(path: str, field: str) -> Records:
    file = Path(path)
    fmt = FILE_FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise StudyError(f"{field}: {path}: unsupported file type; allowed: "
                         f"{', '.join(FILE_FORMATS)}")
    if not file.is_file():
        raise StudyError(f"{field}: {path}: no such file")
    if file.suffix.lower() in (".jsonl", ".txt"):
        _check_lines(file, field, as_json=file.suffix.lower() == ".jsonl")
    try:
        data = datasets.load_dataset(fmt, data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        raise StudyError(f"{field}: {path}: cannot parse as {fmt} ({_first_line(exc)})") from None
    return data.to_list()


def _check_lines(file: Path, field: str, as_json: bool) -> None:
    """Name the first line that is not UTF-8 (or, in JSONL, not one JSON object): `datasets`
    says only that generating the dataset failed, or a later step fails with a traceback."""
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StudyError(f"{field}: {file}: line {number} is not UTF-8 (byte "
                                 f"{exc.start} of the line); save the file as UTF-8") from None
            if as_json and text.strip():
                try:
                    json.loads(text)
                except ValueError as exc:
                    raise StudyError(f"{field}: {file}: line {number} is not valid JSON "
                                     f"({exc.msg} at column {exc.colno})") from None


def _load_named(task: TaskSpec) -> tuple[Records, Records | None]:
    """A hub dataset id or a local dataset folder, through `datasets.load_dataset`."""
    try:
        loaded = datasets.load_dataset(task.dataset, task.dataset_config)
    except Exception as exc:  # offline, unknown id, bad config: all become one line
        reason = _first_line(exc)
        raise StudyError(f"task.dataset: cannot load '{task.dataset}' ({reason})") from None
    if task.train_split not in loaded:
        raise StudyError(f"task.train_split: '{task.train_split}' not in {task.dataset}; "
                         f"splits: {', '.join(loaded)}")
    test = None
    if task.test_split is not None and task.test_split in loaded:
        test = loaded[task.test_split].to_list()
    return loaded[task.train_split].to_list(), test


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def require_field(raw: RawSplits, field: str, setting: str) -> None:
    """A clear error when any split lacks a column the study names, or a record leaves it empty."""
    for split, records in (("training", raw.train), ("validation", raw.validation),
                           ("test", raw.test or [])):
        if records and field not in records[0]:
            raise StudyError(f"{setting}: the {split} data has no field '{field}'; fields: "
                             f"{', '.join(records[0])}")
        for number, record in enumerate(records):
            value = record.get(field)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise StudyError(f"{setting}: record {number} of the {split} data has no "
                                 f"'{field}' (null or NaN)")
