"""`lorasweep curvature STUDY.yaml|DIR`: measure, write curvature.csv and curvature.md, and
return the section's text (with the LR predictions wherever measured optima exist)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lorasweep.analysis.optima import find_optima
from lorasweep.config import Study, load_study, resolve_study_path
from lorasweep.curvature.measure import (
    BLOCK_KINDS,
    Settings,
    measure_cell,
    select_cells,
)
from lorasweep.errors import StudyError
from lorasweep.files import write_text
from lorasweep.kinds import kind_of
from lorasweep.records import (
    OPTIMA_CSV,
    CurvatureRecord,
    Optimum,
    read_curvature_csv,
    read_optima_csv,
    trial_records,
    write_curvature_csv,
)
from lorasweep.report.curvature import curvature_tables
from lorasweep.report.tables import markdown_report
from lorasweep.study.folder import STUDY_FILE, load_folder_study, open_for_reading, started
from lorasweep.workbench import load_workbench

CURVATURE_MD = "curvature.md"


def open_target(target: str, out: Path | None, overrides: list[str]) -> tuple[Study, Path]:
    """The study and the folder to write into: a study folder itself, or --out (default
    lorasweep-studies/NAME, where `lorasweep run` puts the study) for a study file."""
    study, folder = _open_target(target, out, overrides)
    if study.trainer is not None:
        raise StudyError(f"{target}: curvature is measured on lorasweep's own model and data; "
                         "this study's trainer command keeps both to itself")
    refused = kind_of(study.task.kind).no_curvature
    if refused is not None:
        raise StudyError(f"{target}: {refused}")
    return study, folder


def _open_target(target: str, out: Path | None, overrides: list[str]) -> tuple[Study, Path]:
    path = Path(target)
    if path.is_dir() and (path / STUDY_FILE).exists():
        if overrides:
            raise StudyError(f"--set: {target} is a study folder, whose study is fixed; give "
                             "the study file to override fields")
        return load_folder_study(path), out or path
    study = load_study(resolve_study_path(target), overrides)
    return study, out or Path("lorasweep-studies") / study.name


def check_settings(settings: Settings) -> None:
    """One-line errors for options that cannot work."""
    if settings.batches < 1:
        raise StudyError(f"--batches {settings.batches}: must be at least 1")
    if settings.warmup_steps < 0:
        raise StudyError(f"--warmup-steps {settings.warmup_steps}: must be 0 or more")
    if settings.warmup_lr is not None and settings.warmup_lr <= 0:
        raise StudyError(f"--warmup-lr {settings.warmup_lr}: must be positive")
    if settings.top_k < 1:
        raise StudyError(f"--top-k {settings.top_k}: must be at least 1")
    if settings.max_iter < 2:
        raise StudyError(f"--max-iter {settings.max_iter}: must be at least 2")
    if not 0 < settings.tol < 1:
        raise StudyError(f"--tol {settings.tol}: must lie between 0 and 1")
    unknown = [b for b in settings.blocks if b not in BLOCK_KINDS]
    if unknown or not settings.blocks:
        raise StudyError(f"--blocks {','.join(settings.blocks)}: allowed: "
                         f"{', '.join(BLOCK_KINDS)} (comma-joined)")
    if settings.adam and not settings.warmup_steps:
        raise StudyError("--adam: needs --warmup-steps N > 0 (AdamW has no second moment "
                         "before its first step)")


def measured_optima(folder: Path, study: Study, optima_file: Path | None) -> list[Optimum]:
    """Optima: from --optima, else from the folder's trials, else from its optima.csv."""
    if optima_file is not None:
        return read_optima_csv(optima_file, f"--optima {optima_file}")
    if started(folder):  # its records, in its journal or its database
        _, store = open_for_reading(folder)
        return find_optima(trial_records(store, study.task.objective), study.task.maximize)
    if (folder / OPTIMA_CSV).exists():
        return read_optima_csv(folder / OPTIMA_CSV)
    return []


def run_curvature(target: str, settings: Settings, out: Path | None = None,
                  overrides: list[str] | None = None, methods: list[str] | None = None,
                  rank: int | None = None, optima_file: Path | None = None,
                  log: Callable[[str], None] = print) -> tuple[Path, str]:
    """Measure the chosen cells; returns the folder written and the section as Markdown."""
    check_settings(settings)
    study, folder = open_target(target, out, overrides or [])
    cells = select_cells(study, methods, rank)
    optima = measured_optima(folder, study, optima_file)
    lr_stars = {optimum.cell: optimum.lr_star for optimum in optima}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"--out {folder}: cannot write there ({exc.strerror})") from None
    bench = load_workbench(study)
    records: list[CurvatureRecord] = []
    for cell, lrs in cells:
        log(f"measuring {cell.label}" + (f" r={cell.rank}" if cell.rank else ""))
        records += measure_cell(bench, study, cell, lrs, settings, log=log,
                                lr_star=lr_stars.get(cell.recorded))
    measured = {r.cell for r in records}
    kept = [r for r in read_curvature_csv(folder) if r.cell not in measured]
    write_curvature_csv(folder, kept + records)
    text = markdown_report(f"Curvature: {study.name}",
                           curvature_tables(read_curvature_csv(folder), optima), [])
    write_text(folder / CURVATURE_MD, text)
    return folder, text

