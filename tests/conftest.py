"""Shared test fixtures: small learnable data files and study files on tiny models."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "sports": ["match", "goal", "team", "coach", "season", "league", "score", "player"],
    "weather": ["rain", "cloud", "storm", "sunny", "wind", "snow", "forecast", "cold"],
    "food": ["bread", "cheese", "soup", "apple", "dinner", "recipe", "salt", "butter"],
}
FILLER = ["the", "a", "today", "we", "saw", "some", "very", "and", "it", "was", "this", "of"]


def make_records(count: int, seed: int) -> list[dict]:
    """Sentences whose class shows in a few topic words among filler: learnable in a few steps."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        label = list(WORDS)[i % len(WORDS)]
        words = rng.choices(FILLER, k=8) + rng.choices(WORDS[label], k=3)
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def trial_records(rows: list) -> list:
    """Synthetic trials.csv-style rows (dicts, numbered when they have no `trial`) as the
    analysis takes them; records pass through."""
    from lorasweep.records import TrialRecord

    return [row if isinstance(row, TrialRecord) else TrialRecord.from_row({"trial": i, **row})
            for i, row in enumerate(rows)]


def read_rows(folder: Path) -> list[dict]:
    """The rows of a study folder's trials.csv."""
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, Path]:
    return {"train": write_jsonl(tmp_path / "train.jsonl", make_records(240, 0)),
            "test": write_jsonl(tmp_path / "test.jsonl", make_records(60, 1))}


def tiny_study(data: dict[str, Path], **sections: dict) -> dict:
    """A complete study on tiny:bert that trains in seconds; `sections` replace parts of it."""
    study = {
        "name": "tiny",
        "seed": 0,
        "model": {"source": "tiny:bert"},
        "task": {"kind": "classification", "train_file": str(data["train"]),
                 "test_file": str(data["test"]), "validation_size": 60},
        "train": {"steps": 12, "batch_size": 8, "seq_len": 24, "warmup_ratio": 0.1},
        "search": {"methods": ["lora", "full"], "ranks": [4], "lora_alpha": ["2r"],
                   "lr": [1e-3, 1e-2], "seeds": [0]},
    }
    for name, value in sections.items():
        study[name] = {**study[name], **value} if isinstance(value, dict) else value
    return study


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the module's own (skipped where PostgreSQL is not installed,
    failed instead with LORASWEEP_REQUIRE_POSTGRES set, as in .ci/run)."""
    from .postgres_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("LORASWEEP_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL's binaries are missing (Debian package postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.remove()


@pytest.fixture
def study_file(tmp_path: Path, data_files: dict[str, Path]):
    """Write a tiny study (with optional section overrides) and return its path."""

    def write(**sections: dict) -> Path:
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(tiny_study(data_files, **sections)))
        return path

    return write
