"""Tasks: one module per kind; `build_task` turns a study's task section into splits of model
inputs (tokenized text, pixel values, or a denoiser's noised latents)."""

from __future__ import annotations

from lorasweep.config import Study
from lorasweep.models import Preprocessor
from lorasweep.tasks import chat
from lorasweep.tasks.base import Split, Task, TokenSplit, logits_of
from lorasweep.tasks.causal_lm import build_causal_lm
from lorasweep.tasks.classification import ClassificationTask, build_classification
from lorasweep.tasks.code import build_code
from lorasweep.tasks.data import load_splits
from lorasweep.tasks.image_classification import build_image_classification
from lorasweep.tasks.image_generation import build_image_generation
from lorasweep.tasks.math import build_math
from lorasweep.tasks.rl import build_rl

BUILDERS = {"classification": build_classification, "causal_lm": build_causal_lm,
            "math": build_math, "code": build_code,
            "image_classification": build_image_classification,
            "image_generation": build_image_generation}


def build_task(study: Study, preprocessor: Preprocessor, seq_len: int | None = None) -> Task:
    """The study's task as model inputs: text tokenized to `seq_len` (default: the train
    section's) by the model's tokenizer, images by its image processor."""
    spec = study.task
    # chat data (messages_field) is text: config.py refuses it for image kinds
    check = None if spec.messages_field is None else chat.row_checker(spec, preprocessor)
    raw = load_splits(spec, study.seed, check)
    if spec.messages_field is not None and spec.kind == "causal_lm":
        return chat.build_chat_lm(spec, raw, preprocessor, seq_len or study.train.seq_len)
    if spec.messages_field is not None:
        spec, raw = chat.as_pairs(spec, raw)
    if spec.kind == "rl":  # the only builder that reads the study's rl section and seed
        return build_rl(study, raw, preprocessor, seq_len or study.train.seq_len)
    return BUILDERS[spec.kind](spec, raw, preprocessor, seq_len or study.train.seq_len)


def num_labels(task: Task) -> int | None:
    return len(task.label_names) if isinstance(task, ClassificationTask) else None


__all__ = ["Split", "Task", "TokenSplit", "build_task", "logits_of", "num_labels"]
