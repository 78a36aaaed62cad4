"""The study file: its schema, YAML loading, command-line overrides, and one-line errors.

A study file names a model, a task, a training recipe and a search space. Everything a user can
get wrong is checked here, before any model is loaded, so a typo costs a second, not a sweep.
One module per section of the file (`model`, `task`, `train`, `rl`, `search`, `trainer`,
`track`), the whole `study` and its cross-section rules, `loading` (files, `--set`, stored
studies) and `error_text`; what depends on a task kind is read from kinds.KINDS, what depends
on a method from variants.VARIANTS. The names the rest of lorasweep uses are importable from here.
"""

from lorasweep.config.base import OneOf
from lorasweep.config.loading import (
    BUILTIN_STUDIES_DIR,
    STORED_DEFAULTS,
    dump_study,
    load_study,
    resolve_study_path,
    validate_stored_study,
    validate_study,
)
from lorasweep.config.model import ModelSpec
from lorasweep.config.rl import RLSpec
from lorasweep.config.search import (
    DATA_AXIS,
    RECIPE_TRAIN_AXES,
    TARGETS_AXIS,
    LRRange,
    MethodEntry,
    SearchSpec,
    StopEarly,
    alpha_value,
    parse_lora_alpha,
)
from lorasweep.config.study import Study
from lorasweep.config.task import TaskSpec
from lorasweep.config.track import TrackSpec
from lorasweep.config.train import TrainSpec
from lorasweep.config.trainer import ResultSpec, TrainerSpec

__all__ = [
    "BUILTIN_STUDIES_DIR", "DATA_AXIS", "RECIPE_TRAIN_AXES", "STORED_DEFAULTS",
    "TARGETS_AXIS", "LRRange", "MethodEntry", "ModelSpec", "OneOf", "RLSpec",
    "ResultSpec", "SearchSpec", "StopEarly", "Study", "TaskSpec", "TrackSpec", "TrainSpec",
    "TrainerSpec", "alpha_value",
    "dump_study", "load_study", "parse_lora_alpha",
    "resolve_study_path", "validate_stored_study", "validate_study",
]
