"""Raw examples from the built-in data, local files or folders, or the hub, and the validation
split.

Optima are chosen on a validation split: the data's own when the study names it
(`task.validation_split`, `task.validation_file`), used as given; else one carved from the training
data with the study seed. Either way every trial sees the same split, and the test split is only
reported, never used to choose anything.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np

from lorasweep.config import TaskSpec
from lorasweep.errors import StudyError, first_line
from lorasweep.tasks import packaged_data

BUILTIN_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Built-in datasets stored in lorasweep: their folder under data/, which holds a train and a test
# file (JSON lines for text, parquet with an image column for images).
BUILTIN_DATASETS = {"builtin:shakespeare-genre": "shakespeare_genre",
                    "builtin:shakespeare-plays": "shakespeare_plays",
                    "builtin:digits-0-4": "digits/0-4",
                    "builtin:digits-5-9": "digits/5-9",
                    "builtin:digits-vqa-0-4": "digits_vqa/0-4",
                    "builtin:digits-vqa-5-9": "digits_vqa/5-9",
                    "builtin:arithmetic": "arithmetic"}
# Built-in datasets read from pip packages: (train, test) records.
PACKAGED_DATASETS = {"builtin:gsm8k": packaged_data.gsm8k,
                     "builtin:humaneval": packaged_data.humaneval}
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text",
                ".parquet": "parquet"}
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_MARKERS = ("dataset_dict.json", "state.json")

Records = list[dict]


@dataclasses.dataclass
class RawSplits:
    """The records of each split, in the order the study uses them (training shuffled)."""

    train: Records
    validation: Records
    test: Records | None
    # Where each record is stored, by split ("training", "validation", "test"): (the data it
    # came from, its row there), so an error names the row a person finds in their file.
    stored: dict[str, list[tuple[str, int]]] = dataclasses.field(default_factory=dict)

    def where(self, split: str, index: int) -> str:
        """The record's place as stored: "row 17 of the training data"."""
        source, row = self.stored[split][index] if split in self.stored else (split, index)
        return f"row {row} of the {source} data"


# Checks the rows a study uses: check(records, numbers, source) looks at records[i] for each i in
# numbers, and names a bad one as "row i of the <source> data" (numbered as stored).
RowCheck = Callable[[Records, Sequence[int], str], None]


def load_splits(task: TaskSpec, seed: int, check: RowCheck | None = None) -> RawSplits:
    """Train, validation (the data's own, else carved from train) and test records for a task.

    `check` sees each row that is used, before the carve shuffles it, so its errors number
    the rows as stored."""
    train, validation, test = _load_sources(task)
    if not train:
        raise StudyError("task: the training data has no examples")
    order = np.random.default_rng(seed).permutation(len(train))
    cap = task.max_eval_examples
    carved: Sequence[int] = ()
    if validation is None:
        size = task.validation_size
        n_val = int(size) if size >= 1 else max(1, round(len(train) * size))
        if cap is not None:  # held-out examples beyond the cap go to training
            n_val = min(n_val, cap)
        if n_val >= len(train):
            raise StudyError(f"task.validation_size: {size} leaves no training examples "
                             f"(the training data has {len(train)})")
        carved, order = order[:n_val], order[n_val:]
    elif not validation:
        raise StudyError(f"task.{_validation_setting(task)}: the validation data has no examples")
    elif cap is not None:
        validation = validation[:cap]
    # The rest in shuffled order, so a smaller max_train_examples is a prefix of a larger one.
    if task.max_train_examples is not None:
        order = order[:task.max_train_examples]
    if cap is not None and test is not None:
        test = test[:cap]
    if check is not None:
        check(train, sorted([*carved, *order]), "training")
        for records, source in ((validation, "validation"), (test, "test")):
            if records is not None:
                check(records, range(len(records)), source)
    stored = {"training": [("training", int(i)) for i in order],
              "validation": ([("training", int(i)) for i in carved] if validation is None
                             else [("validation", i) for i in range(len(validation))]),
              "test": [("test", i) for i in range(len(test or []))]}
    if validation is None:
        validation = [train[i] for i in carved]
    return RawSplits(train=[train[i] for i in order], validation=validation, test=test,
                     stored=stored)


def _validation_setting(task: TaskSpec) -> str:
    return "validation_split" if task.validation_split is not None else "validation_file"


def _load_sources(task: TaskSpec) -> tuple[Records, Records | None, Records | None]:
    """Training records, the data's own validation records (None: carve), test records."""
    if task.train_file is not None:
        def optional(path: str | None, setting: str) -> Records | None:
            return None if path is None else _load_file(path, setting)

        return (_load_file(task.train_file, "task.train_file"),
                optional(task.validation_file, "task.validation_file"),
                optional(task.test_file, "task.test_file"))
    assert task.dataset is not None
    return _pick_splits(task, _dataset_splits(task))


def _dataset_splits(task: TaskSpec) -> Mapping:
    """The named splits of `task.dataset`: lists of records or `datasets.Dataset`s."""
    if task.dataset in PACKAGED_DATASETS:
        return dict(zip(("train", "test"), PACKAGED_DATASETS[task.dataset](), strict=True))
    if task.dataset.startswith("builtin:"):
        if task.dataset not in BUILTIN_DATASETS:
            raise StudyError(f"task.dataset: unknown '{task.dataset}'; built-in datasets: "
                             f"{', '.join([*BUILTIN_DATASETS, *PACKAGED_DATASETS])}")
        folder = BUILTIN_DATA_DIR / BUILTIN_DATASETS[task.dataset]
        return {name: _load_file(str(next(folder.glob(f"{name}.*"))), "task.dataset")
                for name in ("train", "test")}
    path = Path(task.dataset)
    if path.is_file():  # one file is the training data
        return {"train": _load_file(task.dataset, "task.dataset")}
    if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # a damaged or partly copied folder: one line
            raise StudyError(f"task.dataset: cannot load the saved dataset '{task.dataset}' "
                             f"({first_line(exc)})") from None
        # A saved Dataset (not a DatasetDict) is the training data.
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else loaded
    return _load_named(task)


def _pick_splits(task: TaskSpec, splits: Mapping
                 ) -> tuple[Records, Records | None, Records | None]:
    """The train, validation (None unless named) and test splits the study names.

    The test split is read when the data has one; it is never the validation split, so it is
    never used to choose anything."""
    names = ", ".join(splits)
    for setting in ("train_split", "validation_split"):
        name = getattr(task, setting)
        if name is not None and name not in splits:
            raise StudyError(f"task.{setting}: '{name}' not in {task.dataset}; splits: {names}")
    if task.validation_split is not None and task.validation_split in (task.train_split,
                                                                         task.test_split):
        role = "training" if task.validation_split == task.train_split else "test"
        raise StudyError(f"task.validation_split: '{task.validation_split}' is the {role} split; "
                         f"name another of: {names}")

    def records(name: str | None) -> Records | None:
        if name is None or name not in splits:
            return None
        split = splits[name]
        return split if isinstance(split, list) else _to_records(split)

    return (records(task.train_split), records(task.validation_split),
            records(task.test_split))


def _load_file(path: str, field: str) -> Records:
    """Records of one file, or of the files a glob pattern matches (`data/train-*.parquet`)."""
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    if not files:
        raise StudyError(f"{field}: {path}: no file matches")
    formats = {FILE_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) > 1:
        raise StudyError(f"{field}: {path}: unsupported file type; allowed (one type per "
                         f"field): {', '.join(FILE_FORMATS)}")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise StudyError(f"{field}: {missing[0]}: no such file")
    fmt = formats.pop()
    for file in map(Path, files):
        if file.suffix.lower() in (".jsonl", ".txt"):
            _check_lines(file, field, as_json=file.suffix.lower() == ".jsonl")
    try:
        data = datasets.load_dataset(fmt, data_files=files, split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        raise StudyError(f"{field}: {path}: cannot parse as {fmt} ({first_line(exc)})") from None
    return _to_records(data)


def _to_records(data: datasets.Dataset) -> Records:
    """The rows as plain values, image columns left undecoded (their bytes and path): the task
    decodes each image itself, so one that cannot be read is named, not a traceback.

    In image data a class label (an image folder's sub-folder) is its name, so errors and class
    lists read `cat`, not `0`; text data keeps the stored ids, so a study folder made before
    this resumes with the same classes."""
    images = [n for n, f in data.features.items() if isinstance(f, datasets.Image)]
    for name in images:
        data = data.cast_column(name, datasets.Image(decode=False))
    records = data.to_list()
    if images:
        for name, feature in data.features.items():
            if isinstance(feature, datasets.ClassLabel):
                for record in records:
                    if record[name] is not None and record[name] >= 0:  # -1: no label
                        record[name] = feature.int2str(record[name])
    return records


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


def _load_named(task: TaskSpec) -> Mapping:
    """A hub dataset id or a local folder of data files, through `datasets.load_dataset`; a
    folder of images is its `imagefolder` builder's: one sub-folder per class (the label), and
    train/validation/test folders above them as splits."""
    try:
        return datasets.load_dataset(task.dataset, task.dataset_config)
    except Exception as exc:  # offline, unknown id, bad config: all become one line
        reason = first_line(exc)
        raise StudyError(f"task.dataset: cannot load '{task.dataset}' ({reason})") from None


def require_field(raw: RawSplits, field: str, setting: str) -> None:
    """A clear error when any split lacks a column the study names, or a record leaves it empty."""
    for split, records in (("training", raw.train), ("validation", raw.validation),
                           ("test", raw.test or [])):
        if records and field not in records[0]:
            raise StudyError(f"{setting}: the {split} data has no field '{field}'; fields: "
                             f"{', '.join(records[0])}")
        for index, record in enumerate(records):
            value = record.get(field)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise StudyError(f"{setting}: {raw.where(split, index)} has no '{field}' "
                                 "(null or NaN)")
