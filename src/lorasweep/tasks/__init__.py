"""Tasks: one module per kind; `build_task` turns a study's task section into splits of model
inputs (tokenized text, pixel values, or a denoiser's noised latents) through the builder its
kind names in kinds.KINDS."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lorasweep.config import Study
from lorasweep.kinds import Kind, kind_of
from lorasweep.models import Preprocessor
from lorasweep.tasks import chat
from lorasweep.tasks.base import Split, Task, TokenSplit, logits_of
from lorasweep.tasks.classification import ClassificationTask
from lorasweep.tasks.data import RawSplits, load_splits

# A kind's builder: (study, its raw splits, the preprocessor, seq_len) -> its Task. The study's
# task section is as the builder reads it (chat data of a `pair` kind already made pairs).
Builder = Callable[[Study, RawSplits, Preprocessor, int], Task]


def builder_of(kind: Kind) -> Builder:
    """The function `kind.builder` names ("module:function"), imported when first needed."""
    assert kind.builder is not None, f"task.kind {kind.name} is trained by its trainer command"
    return _named(kind.builder)


def _named(path: str) -> Callable:
    """The function a kind's row names as "module:function"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_task(study: Study, preprocessor: Preprocessor, seq_len: int | None = None) -> Task:
    """The study's task as model inputs: text tokenized to `seq_len` (default: the train
    section's) by the model's tokenizer, images by its image processor."""
    spec = study.task
    kind = kind_of(spec.kind)
    # chat data (messages_field) is text: config/task.py refuses it for kinds that read none
    rows = chat.row_checker if kind.rows is None else _named(kind.rows)
    check = None if spec.messages_field is None else rows(spec, preprocessor)
    raw = load_splits(spec, study.seed, check)
    if spec.messages_field is not None and kind.messages == "pair":
        spec, raw = chat.as_pairs(spec, raw)
        study = study.model_copy(update={"task": spec})
    return builder_of(kind)(study, raw, preprocessor, seq_len or study.train.seq_len)


def num_labels(task: Task) -> int | None:
    return len(task.label_names) if isinstance(task, ClassificationTask) else None


__all__ = ["Split", "Task", "TokenSplit", "build_task", "logits_of", "num_labels"]
