"""Tasks: one module per kind; `build_task` turns a study's task section into tokenized splits."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lorasweep.config import Study
from lorasweep.errors import StudyError
from lorasweep.tasks import chat
from lorasweep.tasks.base import Split, Task
from lorasweep.tasks.causal_lm import build_causal_lm
from lorasweep.tasks.classification import ClassificationTask, build_classification
from lorasweep.tasks.code import build_code
from lorasweep.tasks.data import load_splits
from lorasweep.tasks.math import build_math

BUILDERS = {"classification": build_classification, "causal_lm": build_causal_lm,
            "math": build_math, "code": build_code}


def build_task(study: Study, tokenizer: PreTrainedTokenizerBase, seq_len: int | None = None
               ) -> Task:
    """The study's task tokenized to `seq_len` (default: the train section's)."""
    spec = study.task
    if spec.kind not in BUILDERS:  # rl: its trainer is the next slice of issue 25
        raise StudyError(f"task.kind {spec.kind}: the study file is valid, but lorasweep cannot "
                         "train this kind yet")
    check = None if spec.messages_field is None else chat.row_checker(spec, tokenizer)
    raw = load_splits(spec, study.seed, check)
    if spec.messages_field is not None and spec.kind == "causal_lm":
        return chat.build_chat_lm(spec, raw, tokenizer, seq_len or study.train.seq_len)
    if spec.messages_field is not None:
        spec, raw = chat.as_pairs(spec, raw)
    return BUILDERS[spec.kind](spec, raw, tokenizer, seq_len or study.train.seq_len)


def num_labels(task: Task) -> int | None:
    return len(task.label_names) if isinstance(task, ClassificationTask) else None


__all__ = ["Split", "Task", "build_task", "num_labels"]
