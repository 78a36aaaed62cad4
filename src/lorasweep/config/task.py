"""The study file's `task` section: the data and what is measured on it.

Every rule that depends on the kind reads the kind's row in kinds.KINDS (its metrics, the fields
it needs and refuses, its own checks), so a new kind needs no edit here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from lorasweep.config.base import STRICT, OneOf
from lorasweep.kinds import KINDS, kind_of


class TaskSpec(BaseModel):
    """The data and what is measured on it.

    `dataset` is a built-in one (`builtin:shakespeare-genre`, `builtin:shakespeare-plays`,
    `builtin:gsm8k`, `builtin:arithmetic`, `builtin:humaneval`; images: `builtin:digits-0-4`,
    `builtin:digits-5-9`), a hub dataset id, or a local file/folder (for `image_classification`
    also an image folder, one sub-folder per class); or give `train_file` (and optionally
    `validation_file`, `test_file`) as JSON, JSONL, CSV, text or parquet files. The validation
    split is carved from the training data unless the data has
    one (`validation_split`, `validation_file`), which is then used as given.
    """

    model_config = STRICT

    # external: the study's trainer command loads its own data and reports `metric`
    kind: Annotated[str, BeforeValidator(OneOf(KINDS))]
    dataset: str | None = None
    dataset_config: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    train_split: str = "train"
    validation_split: str | None = None
    test_split: str | None = "test"
    text_field: str = "text"
    label_field: str = "label"
    # image kinds: an image, its file path, or its bytes; vision_language: a row's list of them
    # (its default there is TRL's `images`, as messages_field's is `messages`: kinds.Kind.defaults)
    image_field: str = "image"
    # image_generation: the caption column (None: unconditional, every image under the empty
    # prompt); text kinds: the prompt of a prompt/response pair
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None  # chat data: [{role, content}, ...] per row (tasks/chat.py)
    loss_on: Literal["response", "assistant", "all"] = "all"
    # None when the validation split is given (validation_split, validation_file), not carved
    validation_size: Annotated[float, Field(gt=0)] | None = 0.1
    max_train_examples: Annotated[int, Field(gt=0)] | None = None
    max_eval_examples: Annotated[int, Field(gt=0)] | None = 1000
    # math and code (instruction/response, scored by generation; see tasks/instruction.py)
    answer_field: str | None = None  # math: the gold answer (default: `#### N` of the response)
    chat_template: bool = True  # wrap prompts in the model's own chat template when it has one
    max_new_tokens: Annotated[int, Field(gt=0)] = 256
    samples: Annotated[int, Field(gt=0)] = 1  # code: completions per problem (pass@k)
    temperature: Annotated[float, Field(gt=0)] = 0.8  # code: sampling when samples > 1
    pass_k: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = [1]
    # code, and rl with rl.verifier code: opt-in to run model-written code (with the env
    # variable), and the seconds each sample may run
    execute_code: bool = False
    timeout: Annotated[float, Field(gt=0)] = 5.0
    metric: str | None = None  # the validation metric that chooses optima (kinds.KINDS)
    # Which evaluation of a trial counts: the final one, or the best of the train.eval_every
    # evaluations and the final one ("LoRA Without Regret" takes each LR's best over training).
    select: Literal["final", "best"] = "final"
    # external: whether a higher or a lower metric is better (built-in kinds know their metrics)
    goal: Literal["maximize", "minimize"] | None = None

    @property
    def allowed_metrics(self) -> tuple[str, ...]:
        kind = kind_of(self.kind)
        names = kind.metrics
        if kind.pass_k:
            names += tuple(f"pass@{k}" for k in sorted(set(self.pass_k) - {1}))
        return names

    @property
    def objective(self) -> str:
        """The metric that chooses optima: `metric`, else the kind's default."""
        return self.metric or kind_of(self.kind).default_metric

    @property
    def maximize(self) -> bool:
        if self.goal is not None:
            return self.goal == "maximize"
        return self.objective != "eval_loss"

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, value: Any) -> Any:
        """Defaults that depend on other fields: a given validation split carves nothing
        (validation_size None); chat data trains on assistant turns only, and
        prompt/response data on what the kind says (math and code: response tokens only),
        unless the study says otherwise."""
        if not isinstance(value, dict):
            return value
        kind = value.get("kind")
        if isinstance(kind, str) and kind in KINDS:
            value = {**KINDS[kind].defaults, **value}
        given = any(value.get(n) is not None for n in ("validation_split", "validation_file"))
        if given and "validation_size" not in value:
            value = {**value, "validation_size": None}
        if value.get("messages_field") is not None:
            return {"loss_on": "assistant", **value}
        if isinstance(kind, str) and kind in KINDS and KINDS[kind].loss_on != "all":
            return {"loss_on": KINDS[kind].loss_on, **value}
        return value

    def _check_validation_source(self) -> None:
        given = [f"task.{n}" for n in ("validation_split", "validation_file")
                 if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError("give task.validation_split or task.validation_file, not both")
        if given and self.validation_size is not None:
            raise ValueError(f"{given[0]} is used as given; task.validation_size (which carves "
                             "one from the training data) cannot go with it")
        if not given and self.validation_size is None:
            raise ValueError("task.validation_size: give a size, or task.validation_split or "
                             "task.validation_file")
        if self.validation_split is not None and self.dataset is None:
            raise ValueError("task.validation_split names a split of task.dataset; with "
                             "task.train_file give task.validation_file")
        check = kind_of(self.kind).check
        if check is not None:
            check(self)

    def _check_external(self) -> TaskSpec:
        """An external task is only the metric the command reports and which way is better."""
        if self.metric is None:
            raise ValueError("task.metric: an external task needs the name of the metric its "
                             "command reports (e.g. accuracy, eval_loss)")
        if self.goal is None:
            raise ValueError("task.goal: an external task needs maximize or minimize")
        for name in ("dataset", "train_file", "validation_file", "test_file",
                     "validation_split"):
            if getattr(self, name) is not None:
                raise ValueError(f"task.{name}: the trainer's command loads its own data; "
                                 "remove it")
        return self

    def _check_fields(self) -> None:
        kind = kind_of(self.kind)
        if kind.reads is not None:
            given = [f"task.{n}" for n in kind.refuses
                     if getattr(self, n) is not None] + ["task.loss_on"] * (self.loss_on != "all")
            if given:
                raise ValueError(f"{given[0]}: for text kinds; an {self.kind} task reads "
                                 f"{kind.reads}")
            return
        if self.messages_field is not None:
            self._check_messages()
            return
        if self.loss_on == "assistant":
            raise ValueError("task.loss_on: 'assistant' needs task.messages_field")
        if kind.pairs == "prompt" and self.prompt_field is None:
            raise ValueError(f"task.kind '{self.kind}' needs task.prompt_field (the prompt each "
                             "step samples completions of)")
        if self.loss_on == "response" and self.response_field is None:
            raise ValueError("task.loss_on: 'response' needs task.response_field")
        if (self.prompt_field is None) != (self.response_field is None) \
                and kind.pairs != "prompt":
            raise ValueError("give both task.prompt_field and task.response_field, or neither")
        if kind.pairs == "required" and self.response_field is None:
            raise ValueError(f"task.kind '{self.kind}' needs task.prompt_field and "
                             "task.response_field (e.g. question and answer), or "
                             "task.messages_field")

    def _check_messages(self) -> None:
        """Chat data (task.messages_field), for the kinds that read it."""
        if self.prompt_field is not None or self.response_field is not None:
            raise ValueError("task.messages_field replaces task.prompt_field/response_field;"
                             " give one or the other")
        if kind_of(self.kind).messages is None:
            *others, last = [kind.name for kind in KINDS.values() if kind.messages is not None]
            raise ValueError("task.messages_field: for kinds "
                             + (f"{', '.join(others)} and {last}" if others else last))
        if not self.chat_template:
            raise ValueError("task.messages_field is rendered with the model's chat "
                             "template; task.chat_template: false cannot go with it")
        if self.loss_on == "response":
            raise ValueError("task.loss_on: with task.messages_field, 'assistant' or 'all'")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if kind_of(self.kind).external:
            return self._check_external()
        if self.goal is not None:
            raise ValueError(f"task.goal: a {self.kind} task knows which way its metrics go; "
                             "remove it (it is for task.kind external)")
        if (self.dataset is None) == (self.train_file is None):
            raise ValueError("give exactly one of task.dataset or task.train_file")
        for name in ("validation_file", "test_file"):
            if getattr(self, name) is not None and self.train_file is None:
                raise ValueError(f"task.{name} goes with task.train_file")
        self._check_validation_source()
        self._check_fields()
        if max(self.pass_k) > self.samples:
            raise ValueError(f"task.pass_k {self.pass_k}: each k needs at least k samples "
                             f"(task.samples is {self.samples})")
        size = self.validation_size
        if size is not None and size >= 1 and size != int(size):
            raise ValueError("task.validation_size: a fraction below 1 or a whole number")
        if self.metric is not None and self.metric not in self.allowed_metrics:
            raise ValueError(f"task.metric '{self.metric}': a {self.kind} task reports "
                             f"{', '.join(self.allowed_metrics)}")
        return self
