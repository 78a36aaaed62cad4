"""records.py: each CSV a study writes has one writer and one reader, and they agree."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lorasweep.errors import StudyError
from lorasweep.records import (
    OPTIMA_COLUMNS,
    OPTIMA_CSV,
    Optimum,
    read_curvature_csv,
    read_optima_csv,
    write_curvature_csv,
    write_optima_csv,
)

CELL = {"method": "lora", "rank": 4, "lora_alpha": 8.0, "alpha_mode": "per_rank",
        "init": "kaiming", "target_modules": "all-linear", "recipe": "batch_size=4"}


def optima() -> list[Optimum]:
    return [Optimum(cell=CELL, lr_best=1e-3, lr_star=1.3e-3, lr_star_low=9e-4, lr_star_high=2e-3,
                    peak=0.8, peak_std=0.01, n_seeds=2, edge="high", suggest=[0.02, 0.04],
                    n_lrs=5, diverged=1),
            Optimum(cell={**CELL, "method": "full", "rank": None, "lora_alpha": None,
                          "alpha_mode": None, "init": None, "target_modules": None},
                    lr_best=1e-4, lr_star=1e-4, lr_star_low=None, lr_star_high=None, peak=0.7,
                    peak_std=None, n_seeds=1, edge="flat", suggest=[], n_lrs=3, diverged=0)]


def test_optima_csv_reads_back_as_written(tmp_path: Path):
    write_optima_csv(tmp_path, optima())
    assert read_optima_csv(tmp_path / OPTIMA_CSV) == optima()


def test_an_optima_csv_from_before_recipes_reads_with_no_recipe(tmp_path: Path):
    path = tmp_path / OPTIMA_CSV
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, [c for c in OPTIMA_COLUMNS if c != "recipe"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in o.as_row().items()}
                         for o in optima())
    assert [o.cell["recipe"] for o in read_optima_csv(path)] == [None, None]


@pytest.mark.parametrize(("drop", "message"), [
    ("lr_star", "not an optima.csv (no column lr_star)"),
    ("peak", "not an optima.csv (no column peak)")])
def test_a_file_that_is_not_an_optima_csv_is_one_line(tmp_path: Path, drop: str, message: str):
    path = tmp_path / "other.csv"
    path.write_text(",".join(c for c in OPTIMA_COLUMNS if c != drop) + "\n")
    with pytest.raises(StudyError) as info:
        read_optima_csv(path, f"--optima {path}")
    assert str(info.value) == f"--optima {path}: {message}"


def test_a_bad_value_and_a_missing_file_are_one_line(tmp_path: Path):
    write_optima_csv(tmp_path, optima())
    path = tmp_path / OPTIMA_CSV
    path.write_text(path.read_text().replace("0.8", "high"))
    with pytest.raises(StudyError, match="not as lorasweep writes it"):
        read_optima_csv(path)
    with pytest.raises(StudyError, match=r"nowhere\.csv: no such file"):
        read_optima_csv(tmp_path / "nowhere.csv")


def test_curvature_csv_reads_back_as_text(tmp_path: Path):
    assert read_curvature_csv(tmp_path) == []
    write_curvature_csv(tmp_path, [{**CELL, "block": "joint", "lambda_max": 2.5, "error": None}])
    (row,) = read_curvature_csv(tmp_path)
    assert row["block"] == "joint" and row["lambda_max"] == "2.5" and row["error"] == ""
    assert row["rank"] == "4" and row["stage"] == ""
