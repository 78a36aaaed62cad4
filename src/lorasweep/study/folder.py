"""The study folder: the resolved study file, the environment it ran in, and its guard.

A folder belongs to one model, task and recipe. Re-running it resumes; widening the search
(more LRs, ranks or seeds) adds trials; changing what the existing trials mean is refused.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from lorasweep.config import STORED_DEFAULTS, Study, dump_study, validate_stored_study
from lorasweep.errors import StudyError
from lorasweep.files import append_text, atomic_path, check_writable, write_text
from lorasweep.records import Checkpoint
from lorasweep.redact import redact_argv, redact_text
from lorasweep.space import TrialSpec
from lorasweep.study.backend import JOURNAL_NAME, STORAGE_FILE, storage_address, storage_of
from lorasweep.study.defaults import DEFAULT_PATIENCE_SECONDS
from lorasweep.study.store import Store

STUDY_FILE = "study.yaml"
WEIGHTS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"  # search.stop_early: trials paused at a rung
ENVIRONMENT_FILE = "environment.json"
RUNS_FILE = "runs.jsonl"
PACKAGES = ("lorasweep", "torch", "transformers", "peft", "optuna", "datasets", "accelerate",
            "numpy", "pydantic")
# Sections whose change would make the recorded trials mean something else.
FIXED_SECTIONS = ("name", "seed", "model", "task", "train", "trainer")


def prepare_folder(folder: Path, study: Study, storage_url: str | None = None) -> None:
    """Create or reopen a study folder; refuse one that holds a different study."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder)
    except OSError as exc:
        raise StudyError(f"--out {folder}: cannot write there ({exc.strerror})") from None
    existing = folder / STUDY_FILE
    if existing.exists():
        _check_same_study(existing, study)
    _check_same_storage(folder, storage_url)
    environment = describe_environment()
    try:  # each write is whole or nothing, so a full disk half-way loses nothing
        write_text(existing, dump_study(study))
        if storage_url is not None:
            write_text(folder / STORAGE_FILE,
                       json.dumps({"storage": storage_address(storage_url)}, indent=2) + "\n")
        write_text(folder / ENVIRONMENT_FILE, json.dumps(environment, indent=2) + "\n")
        append_text(folder / RUNS_FILE, json.dumps(environment) + "\n")
    except OSError as exc:
        raise StudyError(f"--out {folder}: cannot write there ({exc.strerror}); what was "
                         "recorded before is intact") from None


def _check_same_storage(folder: Path, storage_url: str | None) -> None:
    """A folder's records live in one place: its journal file or one database."""
    if storage_url is None:
        return
    recorded = storage_of(folder)
    if recorded is not None and storage_address(storage_url) != storage_address(recorded):
        raise StudyError(f"--storage {redact_text(storage_url)}: the folder {folder} belongs to "
                         f"the study in {storage_address(recorded)}; use another --out")
    if recorded is None and (folder / JOURNAL_NAME).exists():
        raise StudyError(f"--storage {redact_text(storage_url)}: the folder {folder} already "
                         "holds a study in its journal file; use another --out")


def started(folder: Path) -> bool:
    """Whether the folder's study has records: its journal file, or a database it names."""
    return (folder / STORAGE_FILE).exists() or (folder / JOURNAL_NAME).exists()


def open_for_reading(folder: Path | None, storage_url: str | None = None, *,
                     study_name: str | None = None,
                     patience: float = DEFAULT_PATIENCE_SECONDS) -> tuple[Study, Store]:
    """An existing study and its store, for reading: nothing is created.

    From a started study folder: its study.yaml, and its journal or the database its storage
    file names. `storage_url` is the full URL this process was given (with the password the
    folder does not keep); it is used when it names that database.
    With `study_name`: that study in the database `storage_url`, whose resolved study file the
    store keeps (a worker on another machine has no folder to read it from).
    """
    if study_name is not None:
        if storage_url is None:
            raise StudyError("--study: needs --storage URL (the database the study lives in)")
        store = Store(folder or Path("."), study_name, maximize=True, create=False,
                      storage_url=storage_url, patience=patience)
        where = f"--storage {redact_text(storage_url)} study {study_name}"
        return validate_stored_study(yaml.safe_load(store.study_text()), where), store
    assert folder is not None, "a study folder or a study name"
    study = load_folder_study(folder)
    url = storage_of(folder)
    if (url is not None and storage_url is not None
            and storage_address(storage_url) == storage_address(url)):
        url = storage_url
    if not started(folder):
        raise StudyError(f"{folder}: the study has not started (no {JOURNAL_NAME})")
    return study, Store(folder, study.name, maximize=study.task.maximize, create=False,
                        storage_url=url, patience=patience)


def open_for_running(study: Study, folder: Path, storage_url: str | None = None,
                     patience: float = DEFAULT_PATIENCE_SECONDS) -> Store:
    """Prepare the folder and open (creating once) the study's store, for workers to train from.

    The records stay where the folder keeps them: `storage_url`, or the database its storage
    file names, or its journal.
    """
    prepare_folder(folder, study, storage_url)
    return Store(folder, study.name, maximize=study.task.maximize, create=True,
                 storage_url=storage_url or storage_of(folder), patience=patience)


def as_in_folder(study: Study, folder: Path) -> Study:
    """The study to resume in `folder`: a train field the study file leaves unset, which the
    folder's study.yaml predates, keeps the value its trials were trained with
    (config.STORED_DEFAULTS: an old folder trained with dropout off goes on doing so)."""
    path = folder / STUDY_FILE
    if not path.exists():
        return study
    stored = yaml.safe_load(path.read_text())
    stored_train = stored.get("train") if isinstance(stored, dict) else None
    if not isinstance(stored_train, dict):
        return study
    kept = {name: value for name, value in STORED_DEFAULTS.items()
            if name not in stored_train and name not in study.train.model_fields_set}
    if not kept:
        return study
    return study.model_copy(update={"train": study.train.model_copy(update=kept)})


def load_folder_study(folder: Path) -> Study:
    path = folder / STUDY_FILE
    if not path.exists():
        raise StudyError(f"{folder}: not a study folder (no {STUDY_FILE})")
    return validate_stored_study(yaml.safe_load(path.read_text()), str(path))


def _check_same_study(path: Path, study: Study) -> None:
    # validated first, so a field added to the schema since (with the default it had for the
    # folder's trials) is no change
    old = validate_stored_study(yaml.safe_load(path.read_text()), str(path)).model_dump(mode="json")
    new = study.model_dump(mode="json")
    for dump in (old, new):  # a trainer command's study file may move (another checkout)
        if dump.get("trainer"):
            dump["trainer"].pop("study_dir")
    for section in FIXED_SECTIONS:
        before, after = old.get(section), new.get(section)
        if before != after:
            detail = _first_difference(section, before, after)
            raise StudyError(f"{path.parent}: holds a study with a different {detail}; "
                             "use another --out, or only change the search section")


def _first_difference(prefix: str, before: object, after: object) -> str:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                return _first_difference(f"{prefix}.{key}", before.get(key), after.get(key))
    return f"{prefix} ({before!r} there, {after!r} now)"


def describe_environment() -> dict:
    """Package versions, git commit and machine facts, recorded with every run of a study."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "git": git_state(),
        "command": redact_argv(sys.argv),  # a password given on it must not reach the folder
    }


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (Linux), else what `platform` knows: numbers a run
    records can move on another CPU where a trial is near divergence."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict | None:
    """The commit of the lorasweep source, and whether it had uncommitted changes."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def weights_path(folder: Path, grid_id: int) -> Path:
    return folder / WEIGHTS_DIR / f"trial-{grid_id}.safetensors"


def save_weights(folder: Path, grid_id: int, weights: dict[str, torch.Tensor]) -> None:
    """A finished trial's trained adapter and head, written atomically for `lorasweep export`."""
    path = weights_path(folder, grid_id)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({name: t.contiguous() for name, t in weights.items()}, str(tmp))


def checkpoint_path(folder: Path, grid_id: int, step: int) -> Path:
    return folder / CHECKPOINTS_DIR / f"trial-{grid_id}-step-{step}.pt"


def save_checkpoint(folder: Path, grid_id: int, checkpoint: Checkpoint) -> None:
    """A trial paused at a rung, written atomically before the store records the pause (a
    worker killed in between leaves a file that no record names, which the next pause or the
    trial's end removes)."""
    path = checkpoint_path(folder, grid_id, checkpoint.step)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(checkpoint.as_dict(), tmp)


def load_checkpoints(folder: Path, specs: list[TrialSpec], step: int
                     ) -> dict[str, Checkpoint] | None:
    """The checkpoints of trials going on from the rung at `step`, by trial key; None when any
    is missing (a worker on another machine, without the folder): the group then trains again
    from the start, which reaches the same weights."""
    checkpoints = {}
    for spec in specs:
        path = checkpoint_path(folder, spec.grid_id, step)
        try:
            checkpoints[spec.key] = Checkpoint(**torch.load(path, weights_only=True))
        except FileNotFoundError:
            return None
    return checkpoints


def drop_checkpoints(folder: Path, store: Store) -> None:
    """Delete the checkpoints no trial will resume from: those of trials that ended, and each
    trial's older ones (a later one may be being written by the worker that trains it)."""
    directory = folder / CHECKPOINTS_DIR
    if not directory.is_dir():
        return
    ended, resumes = set(), {}  # grid ids; grid id -> the step its trial resumes from
    for status, trial, _ in store.latest_by_key().values():
        grid_id, attrs = int(trial.user_attrs["grid_id"]), trial.user_attrs
        if status in ("complete", "diverged", "pruned", "failed"):
            ended.add(grid_id)
        else:
            resumes[grid_id] = int(attrs["steps"] if status == "paused"
                                   else attrs.get("from_step", 0))
    for path in directory.glob("trial-*-step-*.pt"):
        grid_id, step = (int(part) for part in path.stem.split("-")[1::2])
        if grid_id in ended or step < resumes.get(grid_id, 0):
            path.unlink(missing_ok=True)
