"""What each task kind is, in one table: the one place a new kind is registered.

A `Kind` says what the rest of lorasweep needs to know of a `task.kind` without building it: the
metrics it reports, the task fields it reads and refuses, the model and preprocessor it loads,
PEFT's task type for it, whether `lorasweep curvature` and `export` apply, and where its builder
lives. The schema (config/task.py) checks a task section against its row; models.py, methods/,
tasks/, the workbench and the commands read the row instead of comparing kind names.

This module imports neither torch nor transformers, so the study file's validation reads it
without loading them: a kind's builder and model class are names, resolved where they are used
(`tasks.build_task`, `models.load_model`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# Kind.model of a kind that trains a diffusion pipeline's denoiser (models.load_denoiser), which
# is no transformers auto class.
DENOISER = "denoiser"


@dataclass(frozen=True)
class Kind:
    """A task kind as the study file, the models, PEFT and the commands see it.

    `metrics`: the validation metrics that may choose optima (`task.metric`), the default first
    (eval_loss is the only one where lower is better); `pass_k`: it also reports pass@k for each
    k in task.pass_k. `builder`: "module:function" that builds its `Task` from (study, raw
    splits, preprocessor, seq_len), None for kind external (the study's trainer command trains
    it). `model`: the transformers auto class its base model loads as, or DENOISER; `labels`:
    that model ends in a freshly drawn head of num_labels outputs (the task's classes), trained
    fully; `preprocessor`: what turns its examples into model inputs (a name in
    models.PREPROCESSORS). `peft_task_type`: PEFT's task_type (None: PEFT has none, and the head
    is saved as modules_to_save, as PEFT's image classification guide does).

    The task fields: a kind that `reads` no text (images) names what it reads instead and
    `refuses` the text fields it cannot use. `messages`: how it reads chat data
    (task.messages_field): whole conversations, the last user turn and its reply as a
    prompt/response `pair`, or None (refused). `pairs`: task.prompt_field/response_field are
    optional (both or neither), required (or chat data), or a `prompt` alone will do (completions
    are sampled). `loss_on`: the default task.loss_on for prompt/response data. `section`: the
    study file's section of its own, given exactly when the kind is this one. `check`: rules of
    its own on the task section (config.TaskSpec), raising ValueError.

    `defaults`: task fields the kind fills when the study leaves them out (vision_language:
    TRL's column names). `rows`: "module:function" giving the check (tasks/data.RowCheck) of
    each row of chat data from (task section, preprocessor); None: tasks/chat.row_checker.

    `no_curvature`, `no_export`: why `lorasweep curvature` cannot measure it, or `lorasweep
    export` cannot write its trials as PEFT adapters (None: they can).
    """

    name: str
    metrics: tuple[str, ...]
    builder: str | None
    pass_k: bool = False
    model: str = "AutoModelForCausalLM"
    labels: bool = False
    preprocessor: str = "tokenizer"
    peft_task_type: str | None = "CAUSAL_LM"
    reads: str | None = None
    refuses: tuple[str, ...] = ()
    messages: Literal["conversation", "pair"] | None = None
    pairs: Literal["optional", "required", "prompt"] = "optional"
    loss_on: Literal["all", "response"] = "all"
    section: str | None = None
    check: Callable[[Any], None] | None = None
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    rows: str | None = None
    no_curvature: str | None = None
    no_export: str | None = None

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    @property
    def external(self) -> bool:
        """Trained by the study's trainer command, which loads its own data (task.kind
        external)."""
        return self.builder is None


def _code_data(task: Any) -> None:
    """A code task is validated and tested on HumanEval's own halves (tasks/packaged_data.py)."""
    given = [f"task.{n}" for n in ("validation_split", "validation_file")
             if getattr(task, n) is not None]
    if given:
        raise ValueError(f"{given[0]}: a code task is validated on HumanEval's validation "
                         "half; remove it")
    if task.dataset == "builtin:humaneval":
        raise ValueError("task.dataset: builtin:humaneval holds the code task's own "
                         "validation and test problems, so it cannot train it; give "
                         "instruction data (e.g. a CodeFeedback file)")


def _chat_only(task: Any) -> None:
    """A vision_language task trains on conversations (TRL's messages with images)."""
    if task.messages_field is None:
        raise ValueError("task.messages_field: a vision_language task reads conversations "
                         "(TRL's messages, with image entries) and their images "
                         "(task.image_field)")


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("classification", ("accuracy", "eval_loss"),
         "lorasweep.tasks.classification:build_classification",
         model="AutoModelForSequenceClassification", labels=True, peft_task_type="SEQ_CLS"),
    Kind("image_classification", ("accuracy", "eval_loss"),
         "lorasweep.tasks.image_classification:build_image_classification",
         model="AutoModelForImageClassification", labels=True, preprocessor="image_processor",
         peft_task_type=None, reads="task.image_field and task.label_field",
         refuses=("prompt_field", "response_field", "messages_field")),
    Kind("image_generation", ("eval_loss",),
         "lorasweep.tasks.image_generation:build_image_generation",
         model=DENOISER, preprocessor="diffusion_parts", peft_task_type=None,
         reads="task.image_field and, for captions, task.prompt_field",
         refuses=("response_field", "messages_field", "answer_field")),
    Kind("causal_lm", ("eval_loss",), "lorasweep.tasks.causal_lm:build_causal_lm",
         messages="conversation"),
    Kind("math", ("accuracy_flexible", "accuracy_strict", "eval_loss"),
         "lorasweep.tasks.math:build_math", messages="pair", pairs="required",
         loss_on="response"),
    Kind("code", ("pass@1", "eval_loss"), "lorasweep.tasks.code:build_code", pass_k=True,
         messages="pair", pairs="required", loss_on="response", check=_code_data),
    # image-text chat as TRL's SFTTrainer takes it (tasks/vision_language.py)
    Kind("vision_language", ("eval_loss", "token_accuracy", "exact_match"),
         "lorasweep.tasks.vision_language:build_vision_language",
         model="AutoModelForImageTextToText", preprocessor="processor",
         messages="conversation", check=_chat_only,
         defaults=MappingProxyType({"messages_field": "messages", "image_field": "images"}),
         rows="lorasweep.tasks.vision_language:row_checker"),
    # the metric and its goal are the study's own (task.metric, task.goal)
    Kind("external", (), None),
    Kind("rl", ("mean_reward",), "lorasweep.tasks.rl:build_rl", pairs="prompt", section="rl",
         no_curvature="curvature is measured on a fixed batch's loss; an rl study's loss "
                      "depends on the completions each step samples"),
)}


def kind_of(name: str) -> Kind:
    """The kind of a registered name (a validated study's task.kind)."""
    return KINDS[name]

