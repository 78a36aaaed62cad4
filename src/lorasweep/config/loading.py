"""Reading a study: a file or a built-in study by name, `--set` overrides, the guard against
YAML alias bombs, a study as a folder keeps it, and the resolved study written back as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lorasweep.config.error_text import describe_validation_error
from lorasweep.config.search import TARGETS_AXIS
from lorasweep.config.study import Study
from lorasweep.errors import StudyError

BUILTIN_STUDIES_DIR = Path(__file__).parent.parent / "studies"
# Most values a study file's YAML may expand to through its aliases (`*name`): a few nested
# aliases build billions of values for free, which validation would then walk for hours.
MAX_YAML_VALUES = 100_000
# What a field added to `train` since means in a study folder written before it (its study.yaml
# lacks the field): how those trials were trained, which may differ from a new file's default.
STORED_DEFAULTS = {"dropout": "off"}


def resolve_study_path(study: str) -> Path:
    """A path to a study file, or the name of a built-in study (e.g. `quickstart`). A folder is
    never a study file, so a folder that happens to share a built-in study's name (an `rl/`
    where `lorasweep run rl` is typed) does not hide the built-in."""
    path = Path(study)
    if path.exists() and not path.is_dir():
        return path
    builtin = BUILTIN_STUDIES_DIR / f"{study}.yaml"
    if builtin.exists():
        return builtin
    if path.is_dir():
        raise StudyError(f"{study}: a folder, not a study file (a study folder's own file is "
                         f"{path / 'study.yaml'})")
    names = sorted(p.stem for p in BUILTIN_STUDIES_DIR.glob("*.yaml"))
    raise StudyError(f"{study}: no such study file; built-in studies: {', '.join(names)}")


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise StudyError(f"--set {assignment}: expected FIELD=VALUE, e.g. train.steps=200")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise StudyError(f"--set {assignment}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StudyError(f"--set {assignment}: value is not valid YAML ({exc.problem})") from exc


def load_study(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read, override and validate a study file; every problem becomes one StudyError line."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise StudyError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a text file (a study file is UTF-8 YAML)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise StudyError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a YAML mapping with model, task, train, search")
    for assignment in overrides:
        apply_override(raw, assignment)
    trainer = raw.get("trainer")
    if isinstance(trainer, dict) and trainer.get("study_dir") is None:
        raw["trainer"] = {**trainer, "study_dir": str(path.parent.resolve())}
    if expanded_size(raw, {}, set()) > MAX_YAML_VALUES:
        raise StudyError(f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES} values "
                         "(an alias bomb?); a study needs far fewer")
    return validate_study(raw, str(path))


def expanded_size(value: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `value` holds with every alias expanded, counted without expanding.

    YAML aliases share one object, so each is counted once per id; a container that holds
    itself counts as too many."""
    if not isinstance(value, list | dict):
        return 1
    key = id(value)
    if key in sizes:
        return sizes[key]
    if key in open_:
        return MAX_YAML_VALUES + 1
    open_.add(key)
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += expanded_size(item, sizes, open_)
        if total > MAX_YAML_VALUES:
            break
    open_.discard(key)
    sizes[key] = total
    return total


def validate_stored_study(raw: Any, where: str) -> Study:
    """A study as a folder or store keeps it: train fields it lacks (written before they
    existed) read as STORED_DEFAULTS, what those trials were trained with."""
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = {**raw, "train": {**STORED_DEFAULTS, **raw["train"]}}
    return validate_study(raw, where)


def validate_study(raw: dict[str, Any], where: str) -> Study:
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(f"{where}: {describe_validation_error(exc)}") from None


def dump_study(study: Study) -> str:
    """The resolved study as YAML, every default written out (but search.target_modules when
    the recipe sweeps it: the study file may give it in one place only)."""
    raw = study.model_dump(mode="json")
    if TARGETS_AXIS in raw["search"]["recipe"]:
        del raw["search"]["target_modules"]
    return yaml.safe_dump(raw, sort_keys=False)

