"""records.py: each CSV a study writes has one writer and one reader, and they agree."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from lorasweep.config import load_study
from lorasweep.errors import StudyError
from lorasweep.records import (
    COLUMNS,
    OPTIMA_COLUMNS,
    OPTIMA_CSV,
    TRIALS_CSV,
    CurvatureRecord,
    Optimum,
    read_curvature_csv,
    read_optima_csv,
    read_trials_csv,
    write_curvature_csv,
    write_optima_csv,
)
from lorasweep.space import CELL_FIELDS, Cell, cells_of

CELL = {"method": "lora", "rank": 4, "lora_alpha": 8.0, "alpha_mode": "per_rank",
        "init": "kaiming", "target_modules": "all-linear", "recipe": "batch_size=4"}


def optima() -> list[Optimum]:
    return [Optimum(cell=Cell.from_row(CELL), lr_best=1e-3, lr_star=1.3e-3, lr_star_low=9e-4,
                    lr_star_high=2e-3,
                    peak=0.8, peak_std=0.01, n_seeds=2, edge="high", suggest=[0.02, 0.04],
                    n_lrs=5, diverged=1),
            Optimum(cell=Cell("full", recipe=CELL["recipe"]),
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
    assert [o.cell.recipe for o in read_optima_csv(path)] == [None, None]


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


def test_curvature_csv_reads_back_as_written(tmp_path: Path):
    assert read_curvature_csv(tmp_path) == []
    records = [CurvatureRecord(
        cell=Cell.from_row(CELL), seed=0, stage=stage, steps=steps, warmup_lr=warmup_lr,
        preconditioned=steps > 0, block=block, module_type=kind, params=96,
        lambda_max=2.5, lambda_top="2.5 1.25", lambda_min=-0.125, products=12,
        converged=block == "joint", error=None if block == "joint" else 1e-3, items=40,
        lr_grid_step=0.25)
        for stage, steps, warmup_lr in (("init", 0, None), ("warmup", 2, 3e-3))
        for block, kind in (("joint", ""), ("encoder.layer.0.query", "query"))]
    write_curvature_csv(tmp_path, records)
    assert read_curvature_csv(tmp_path) == records
    path = tmp_path / "curvature.csv"
    text = path.read_text()
    path.write_text(text[:text.rindex("\nlora,") + 30])  # the last row cut short
    with pytest.raises(StudyError, match=r"curvature.csv: not as lorasweep writes it .*a row has"):
        read_curvature_csv(tmp_path)
    (tmp_path / "curvature.csv").write_text("method,rank\nlora,four\n")
    with pytest.raises(StudyError, match=r"curvature.csv: not as lorasweep writes it"):
        read_curvature_csv(tmp_path)


def test_a_cell_reads_back_from_its_row_typed_or_as_text(tmp_path: Path, study_file):
    """Cell.to_row / Cell.from_row are the one pair every file goes through: a study's cells
    (every alpha form, a labelled peft entry, LoRA+, recipe axes, full fine-tuning) come back from
    their rows, typed or as the CSV's text, equal to the cell as recorded; a row keeps everything
    it can (a peft entry's label, lora_alpha as the study file writes it)."""
    study = load_study(study_file(
        search={"methods": ["lora", "loraplus", "full",
                            {"name": "peft", "label": "gauss",
                             "peft": {"init_lora_weights": "gaussian"}}],
                "ranks": [4, 8], "lora_alpha": ["2r", 16, "0.5r"], "lr": [1e-3],
                "recipe": {"batch_size": [4, 8]}}))
    cells = [cell for cell, _ in cells_of(study)]
    path = tmp_path / "cells.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CELL_FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in c.to_row().items()} for c in cells)
    with open(path, newline="") as handle:
        read = [Cell.from_row(row) for row in csv.DictReader(handle)]
    assert read == [Cell.from_row(c.to_row()) for c in cells] == [c.recorded for c in cells]
    assert len(set(read)) == len(cells)  # no two cells of the study read back as one
    for cell, back in zip(cells, read, strict=True):
        assert back.to_row() == cell.to_row()
        assert (back.label, back.alpha, back.alpha_spec) == (cell.label, cell.alpha,
                                                             cell.alpha_spec)
    gauss = next(c for c in read if c.label == "gauss")
    assert (gauss.method, gauss.is_adapter, gauss.init) == ("peft", True, "peft")
    assert next(c for c in read if c.method == "loraplus").loraplus_ratio is None  # study's
    assert Cell("lora", rank=8, lora_alpha="2.0r").alpha_spec == "2r"


@pytest.mark.parametrize(("row", "kind"), [
    ("lora,4,8.0,per_rank,kaiming,all-linear,,0.001\n", "short"),
    ("lora,0,8.0,per_rank,kaiming,all-linear,,0.001,0.001,,,0.5,,1,,,3,0\n", "rank 0"),
    ("lora,4,eight,per_rank,kaiming,all-linear,,0.001,0.001,,,0.5,,1,,,3,0\n", "text")])
def test_a_damaged_optima_csv_row_is_one_line(tmp_path: Path, row: str, kind: str):
    """A row cut short, a rank of 0 or text where a number goes: one line naming the file,
    whatever Python error the row would raise."""
    path = tmp_path / OPTIMA_CSV
    path.write_text(",".join(OPTIMA_COLUMNS) + "\n" + row)
    with pytest.raises(StudyError, match=rf"^{path}: not as lorasweep writes it \("):
        read_optima_csv(path)


def test_a_torn_trials_csv_is_one_line(tmp_path: Path):
    """A trials.csv whose last row was cut short (a copy interrupted) is one line naming it."""
    rows = [{"trial": i, **CELL, "lr": lr, "seed": 0, "status": "complete", "metric": 0.5}
            for i, lr in enumerate((1e-3, 1e-2))]
    with open(tmp_path / TRIALS_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert [r.lr for r in read_trials_csv(tmp_path)] == [1e-3, 1e-2]
    text = (tmp_path / TRIALS_CSV).read_text()
    (tmp_path / TRIALS_CSV).write_text(text[:text.rindex("\n1,") + 40])
    with pytest.raises(StudyError, match=r"trials.csv: not as lorasweep writes it"):
        read_trials_csv(tmp_path)


def test_curves_csv_round_trip_and_report_table(tmp_path: Path):
    """curves.csv holds each trial's per-step curves; the report averages each end over seeds;
    a file whose steps jump is refused in one line naming it."""
    from lorasweep.records import CURVES_CSV, TrialRecord, read_curves_csv, write_curves_csv
    from lorasweep.report.curves import curve_names, curve_tables
    from lorasweep.space import TrialSpec

    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear")

    class Trial:
        def __init__(self, grid_id: int, lr: float, seed: int, curve: list[float]) -> None:
            self.user_attrs = {**TrialSpec(grid_id, cell, lr, seed).to_attrs(),
                               "curves": {"reward": curve}}

    trials = [Trial(0, 1e-3, 0, [0.0] * 9 + [1.0]), Trial(1, 1e-3, 1, [0.5] * 10),
              Trial(2, 1e-2, 0, [1.0] + [0.0] * 9)]

    class Source:
        def latest_by_key(self):
            return {str(i): ("complete", t, 1) for i, t in enumerate(trials)}

    written = write_curves_csv(tmp_path, Source())
    assert read_curves_csv(tmp_path) == written and written[2]["reward"][0] == 1.0
    records = [TrialRecord(trial=i, cell=cell, lr=t.user_attrs["lr"], seed=t.user_attrs["seed"],
                           status="complete", metric=0.5) for i, t in enumerate(trials)]
    (table,) = curve_tables(records, written, "mean_reward")
    assert table.title == "Reward during training"
    assert [row[1:5] for row in table.rows] == [["0.001", "2", "0.25", "0.75"],
                                                ["0.01", "1", "1", "0"]]
    diverged = [dataclasses.replace(r, status="diverged", metric=None) for r in records]
    assert curve_tables(diverged, written, "mean_reward") == []  # nothing to draw, no figure
    assert curve_names(diverged, written) == [] and curve_names(records, written) == ["reward"]
    path = tmp_path / CURVES_CSV
    path.write_text(path.read_text().replace("\n0,reward,2,", "\n0,reward,3,", 1))
    with pytest.raises(StudyError, match=r"curves\.csv: not as lorasweep writes it"):
        read_curves_csv(tmp_path)
