"""The study file: its schema, YAML loading, command-line overrides, and one-line errors.

A study file names a model, a task, a training recipe and a search space. Everything a user can
get wrong is checked here, before any model is loaded, so a typo costs a second, not a sweep.
"""

from __future__ import annotations

import math
import reprlib
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lorasweep.errors import StudyError
from lorasweep.result_key import parse_key
from lorasweep.variants import INITS, VARIANTS, get_init, init_pattern, variant

BUILTIN_STUDIES_DIR = Path(__file__).parent / "studies"

TARGET_PRESETS = ("attention", "mlp", "all-linear")
# The validation metrics each task kind reports that may choose optima (`task.metric`); the first
# is the default. eval_loss is the only one where lower is better. A code task also reports
# pass@k for each k in `task.pass_k`.
KIND_METRICS = {"classification": ("accuracy", "eval_loss"),
                "image_classification": ("accuracy", "eval_loss"), "causal_lm": ("eval_loss",),
                "image_generation": ("eval_loss",),
                "math": ("accuracy_flexible", "accuracy_strict", "eval_loss"),
                "code": ("pass@1", "eval_loss"), "rl": ("mean_reward",)}


# Most values one list of the search may hold: a grid far beyond any real sweep is a mistake that
# would otherwise exhaust memory expanding trials.
MAX_VALUES = 1000
# Most values a study file's YAML may expand to through its aliases (`*name`): a few nested
# aliases build billions of values for free, which validation would then walk for hours.
MAX_YAML_VALUES = 100_000
NO_INF_NAN = ConfigDict(allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Where the base model comes from.

    `source` is a packaged name (`minilm`, `smollm2`, `digits-vit`), a local folder, a Hugging
    Face hub id, `tiny:bert` / `tiny:llama` (random weights from a small config, for tests), or
    `random:llama-1b` / `random:llama-8b` / `random:qwen2-0.5b` (a published architecture with
    random weights, for throughput and memory benchmarks at real size).

    `dtype` is how the frozen base weights are stored (adapters, DoRA magnitudes, the task head
    and the optimizer state stay fp32); None: bf16 when `train.precision` is bf16 on a GPU, else
    fp32 (see precision.py).
    """

    source: str = Field(min_length=1)
    revision: str | None = None
    trust_remote_code: bool = False
    # the frozen base's dtype (precision.py); None: bf16 with train.precision bf16 on a GPU
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    # nf4: the frozen base's block linear layers in 4-bit NormalFloat, as QLoRA (quantize.py)
    quantize: Literal["nf4"] | None = None


# The image kinds: the text fields each refuses, and what it reads instead.
IMAGE_KIND_FIELDS = {
    "image_classification": (("prompt_field", "response_field", "messages_field"),
                             "task.image_field and task.label_field"),
    "image_generation": (("response_field", "messages_field", "answer_field"),
                         "task.image_field and, for captions, task.prompt_field"),
}


class TaskSpec(_Strict):
    """The data and what is measured on it.

    `dataset` is a built-in one (`builtin:shakespeare-genre`, `builtin:shakespeare-plays`,
    `builtin:gsm8k`, `builtin:arithmetic`, `builtin:humaneval`; images: `builtin:digits-0-4`,
    `builtin:digits-5-9`), a hub dataset id, or a local file/folder (for `image_classification`
    also an image folder, one sub-folder per class); or give `train_file` (and optionally
    `validation_file`, `test_file`) as JSON, JSONL, CSV, text or parquet files. The validation
    split is carved from the training data unless the data has
    one (`validation_split`, `validation_file`), which is then used as given.
    """

    # external: the study's trainer command loads its own data and reports `metric`
    kind: Literal["classification", "image_classification", "image_generation", "causal_lm",
                  "math", "code", "external", "rl"]
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
    image_field: str = "image"  # image kinds: an image, its file path, or its bytes
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
    metric: str | None = None  # the validation metric that chooses optima (KIND_METRICS)
    # Which evaluation of a trial counts: the final one, or the best of the train.eval_every
    # evaluations and the final one ("LoRA Without Regret" takes each LR's best over training).
    select: Literal["final", "best"] = "final"
    # external: whether a higher or a lower metric is better (built-in kinds know their metrics)
    goal: Literal["maximize", "minimize"] | None = None

    @property
    def allowed_metrics(self) -> tuple[str, ...]:
        names = KIND_METRICS[self.kind]
        if self.kind == "code":
            names += tuple(f"pass@{k}" for k in sorted(set(self.pass_k) - {1}))
        return names

    @property
    def objective(self) -> str:
        """The metric that chooses optima: `metric`, else the kind's default."""
        return self.metric or KIND_METRICS[self.kind][0]

    @property
    def maximize(self) -> bool:
        if self.goal is not None:
            return self.goal == "maximize"
        return self.objective != "eval_loss"

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, value: Any) -> Any:
        """Defaults that depend on other fields: a given validation split carves nothing
        (validation_size None); chat data trains on assistant turns only, math and code on
        response tokens only, unless the study says otherwise."""
        if not isinstance(value, dict):
            return value
        given = any(value.get(n) is not None for n in ("validation_split", "validation_file"))
        if given and "validation_size" not in value:
            value = {**value, "validation_size": None}
        if value.get("messages_field") is not None:
            return {"loss_on": "assistant", **value}
        if value.get("kind") in ("math", "code"):
            return {"loss_on": "response", **value}
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
        if given and self.kind == "code":
            raise ValueError(f"{given[0]}: a code task is validated on HumanEval's validation "
                             "half; remove it")
        if self.kind == "code" and self.dataset == "builtin:humaneval":
            raise ValueError("task.dataset: builtin:humaneval holds the code task's own "
                             "validation and test problems, so it cannot train it; give "
                             "instruction data (e.g. a CodeFeedback file)")

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
        if self.kind in IMAGE_KIND_FIELDS:
            refused, reads = IMAGE_KIND_FIELDS[self.kind]
            given = [f"task.{n}" for n in refused
                     if getattr(self, n) is not None] + ["task.loss_on"] * (self.loss_on != "all")
            if given:
                raise ValueError(f"{given[0]}: for text kinds; an {self.kind} task reads {reads}")
            return
        if self.messages_field is not None:
            if self.prompt_field is not None or self.response_field is not None:
                raise ValueError("task.messages_field replaces task.prompt_field/response_field;"
                                 " give one or the other")
            if self.kind in ("classification", "rl"):
                raise ValueError("task.messages_field: for kinds causal_lm, math and code")
            if not self.chat_template:
                raise ValueError("task.messages_field is rendered with the model's chat "
                                 "template; task.chat_template: false cannot go with it")
            if self.loss_on == "response":
                raise ValueError("task.loss_on: with task.messages_field, 'assistant' or 'all'")
            return
        if self.loss_on == "assistant":
            raise ValueError("task.loss_on: 'assistant' needs task.messages_field")
        if self.kind == "rl" and self.prompt_field is None:
            raise ValueError("task.kind 'rl' needs task.prompt_field (the prompt each step "
                             "samples completions of)")
        if self.loss_on == "response" and self.response_field is None:
            raise ValueError("task.loss_on: 'response' needs task.response_field")
        if (self.prompt_field is None) != (self.response_field is None) and self.kind != "rl":
            raise ValueError("give both task.prompt_field and task.response_field, or neither")
        if self.kind in ("math", "code") and self.response_field is None:
            raise ValueError(f"task.kind '{self.kind}' needs task.prompt_field and "
                             "task.response_field (e.g. question and answer), or "
                             "task.messages_field")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if self.kind == "external":
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


def _yaml_off(value: Any) -> Any:
    """YAML reads a bare `off` as false: `dropout: off` means the word."""
    return "off" if value is False else value


class TrainSpec(_Strict):
    """The training recipe shared by every trial of the study."""

    steps: Annotated[int, Field(gt=0)] | None = None
    epochs: Annotated[float, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] = 16
    seq_len: Annotated[int, Field(ge=8)] = 64
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    # after the warmup: cosine or linear decay to zero, constant, or wsd (warmup-stable-decay: a
    # constant plateau, then a linear cooldown to zero over the last `decay_ratio` of the steps;
    # other schedules ignore decay_ratio)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_ratio: Annotated[float, Field(gt=0, le=1)] = 0.2
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    adam_eps: Annotated[float, Field(ge=0)] = 1e-8
    eval_every: Annotated[int, Field(ge=0)] = 0
    eval_batch_size: Annotated[int, Field(gt=0)] = 64
    # a trial whose loss grows this many times above its lowest is diverged (not for rl, whose
    # surrogate loss sits near 0 with either sign: there only a non-finite loss is)
    divergence_factor: Annotated[float, Field(gt=1)] = 4.0
    # bf16: matmuls under autocast in bfloat16; trained weights, optimizer state and losses fp32
    precision: Literal["fp32", "bf16"] = "fp32"
    # each step's batch as grad_accum micro-batches of batch_size / grad_accum, summed into the
    # one update the whole batch gives (token-weighted for language tasks; see train.py)
    grad_accum: Annotated[int, Field(gt=0)] = 1
    # recompute each transformer block's activations in the backward instead of keeping them
    gradient_checkpointing: bool = False
    # model: train with the model config's own dropout on, as the HF Trainer does; off: eval
    # mode throughout (a stored study that predates this field was trained off, STORED_DEFAULTS)
    dropout: Annotated[Literal["model", "off"], BeforeValidator(_yaml_off)] = "model"
    # PEFT's lora_dropout: dropout on the adapter's input only (adapter methods; see dropout.py)
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _one_length(self) -> TrainSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.steps or train.epochs")
        if self.schedule == "wsd" and self.warmup_ratio + self.decay_ratio > 1:
            raise ValueError(f"train.warmup_ratio {self.warmup_ratio:g} + train.decay_ratio "
                             f"{self.decay_ratio:g} is above 1: no steps are left between them")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.grad_accum {self.grad_accum} does not divide "
                             f"train.batch_size {self.batch_size}")
        return self


class RLSpec(_Strict):
    """task.kind rl: how each step samples and scores completions and makes them a loss
    (tasks/grpo.py's `Objective`, whose fields carry the same names; TRL's GRPOConfig in
    brackets). Each step takes train.batch_size prompts and samples `group_size` completions of
    each from the trial's own policy; `verifier` scores them (tasks/verifiers.py; math: 1 for
    the right number as the math task extracts it, else 0; code: 1 when the completion passes the
    record's HumanEval-style tests in the sandbox, with task.execute_code's opt-in)."""

    verifier: Literal["math", "code"] = "math"
    group_size: Annotated[int, Field(ge=2)] = 8  # [num_generations]
    temperature: Annotated[float, Field(gt=0)] = 1.0
    max_new_tokens: Annotated[int, Field(gt=0)] = 256  # [max_completion_length]
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    beta: Annotated[float, Field(ge=0)] = 0.0  # the KL to the base model (adapters off)
    epsilon: Annotated[float, Field(gt=0, lt=1)] = 0.2
    epsilon_high: Annotated[float, Field(gt=0)] | None = None
    kl_ratio_correction: bool = True  # [use_bias_correction_kl]
    # seeded samples of each validation prompt its mean reward averages over
    eval_samples: Annotated[int, Field(ge=1)] = 1


class LRRange(_Strict):
    """A log-spaced grid: `per_decade` points per factor of ten from `low` to `high` inclusive."""

    low: Annotated[float, Field(gt=0)]
    high: Annotated[float, Field(gt=0)]
    per_decade: Annotated[float, Field(gt=0, le=20)] = 4

    @model_validator(mode="after")
    def _ordered(self) -> LRRange:
        if self.high < self.low:
            raise ValueError(f"lr.high ({self.high}) is below lr.low ({self.low})")
        if self.count > MAX_VALUES:
            raise ValueError(f"lr {self.low:g} to {self.high:g} at {self.per_decade:g} per "
                             f"decade is {self.count} learning rates; at most {MAX_VALUES}")
        return self

    @property
    def decades(self) -> float:
        # a difference of logs: high / low itself can overflow (1e300 / 1e-300)
        return math.log10(self.high) - math.log10(self.low)

    @property
    def count(self) -> int:
        """How many LRs the range holds, both ends included."""
        return round(self.decades * self.per_decade) + 1

    def values(self) -> list[float]:
        if self.count == 1:
            return [self.low]
        step = self.decades / (self.count - 1)
        return [float(f"{self.low * 10 ** (i * step):.6g}") for i in range(self.count)]


LRGrid = Annotated[list[Annotated[float, Field(gt=0)]],
                   Field(min_length=1, max_length=MAX_VALUES)] | LRRange


def _lr_grid(value: Any) -> Any:
    """A mapping is an LR range, validated as one, so its error names what is wrong with it
    (left to the union, it only said that a list was expected)."""
    if not isinstance(value, dict):
        return value
    try:
        return LRRange.model_validate(value)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc).removeprefix("study: ")) from None


def lr_values(grid: LRGrid) -> list[float]:
    """The learning rates of a grid, sorted, without repeats."""
    raw = grid.values() if isinstance(grid, LRRange) else grid
    return sorted(set(raw))


def _known_init(name: str) -> str:
    """An init registered in variants.INITS (read at validation time, so a registration counts)."""
    if get_init(name) is None:
        raise PydanticCustomError("string_pattern_mismatch",
                                  "String should match pattern '{pattern}'",
                                  {"pattern": init_pattern()})
    return name


def _known_method(name: str) -> str:
    """A method registered in variants.VARIANTS, with pydantic's own Literal message."""
    if name not in VARIANTS:
        names = [repr(n) for n in VARIANTS]
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": ", ".join(names[:-1]) + " or " + names[-1]})
    return name


InitName = Annotated[str, AfterValidator(_known_init)]


class MethodEntry(_Strict):
    """A method in the search space, optionally with its own LR grid (full FT wants lower LRs)
    and its own init (e.g. `{name: pissa, init: pissa_niter_4}`)."""

    name: Annotated[str, AfterValidator(_known_method)]
    lr: LRGrid | None = None
    init: InitName | None = None
    # For `peft`: the PEFT config class and its keyword arguments, trained as PEFT trains them
    # (unfused); r, lora_alpha and target_modules come from the search axes unless given here.
    peft: dict[str, Any] | None = None
    peft_config: str = "LoraConfig"
    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.+-]+$")

    _lr_range = field_validator("lr", mode="before")(_lr_grid)

    @model_validator(mode="after")
    def _fits(self) -> MethodEntry:
        if self.init is not None and not variant(self.name).takes_init:
            raise ValueError(f"{self.name}: give no init (peft: put it in its arguments)")
        if (self.peft is not None) != (self.name == "peft"):
            raise ValueError("'peft:' arguments go with (and only with) method name 'peft'")
        if self.label is not None and self.name != "peft":
            raise ValueError("a label names a peft entry; other methods go by their names")
        if self.peft is not None:
            check_peft_arguments(self.peft_config, self.peft)
        return self

    @property
    def display_name(self) -> str:
        return self.label or self.name

    def inits(self, default: list[str]) -> list[str]:
        """The inits this method's cells take."""
        if self.init is not None:
            return [self.init]
        return variant(self.name).inits(default)


class StopEarly(_Strict):
    """search.stop_early: stop the LRs of a cell that cannot be its optimum (study/rungs.py).

    At each rung (a fraction of the trial's steps) every trial of the cell is evaluated after a
    decay probe: a copy of its weights and optimizer state trained `cooldown` x the rung's step
    more steps with the LR falling linearly from the schedule's value to zero, then thrown away.
    The probe reads what the run would score if it ended there, where the mid-run metric of a
    high LR still carries the noise that the decay removes. Once every trial of the cell has
    reached a rung, the LRs outside a window around the rung's best stop (status pruned): one
    grid step above it, and below it `drift` decades of LR per decade of training still to go
    (a longer run's optimum sits at a lower LR), at least one grid step; so the best and its
    grid neighbours never stop. `stop: false` records the rungs and stops nothing (a full grid
    for benchmarks/search_cost.py to replay)."""

    rungs: Annotated[list[Annotated[float, Field(gt=0, lt=1)]],
                     Field(min_length=1, max_length=8)] = [0.0625, 0.125, 0.25]
    cooldown: Annotated[float, Field(gt=0, le=1)] = 0.25
    drift: Annotated[float, Field(ge=0, le=2)] = 0.3
    stop: bool = True

    @field_validator("rungs")
    @classmethod
    def _ascending(cls, value: list[float]) -> list[float]:
        if sorted(set(value)) != value:
            raise ValueError(f"{value}: give each rung once, in ascending order")
        return value


class SearchSpec(_Strict):
    """The axes swept: every combination of these (and each LR and seed) is one trial."""

    methods: Annotated[list[MethodEntry], Field(min_length=1, max_length=MAX_VALUES)]
    ranks: Annotated[list[Annotated[int, Field(gt=0)]],
                     Field(min_length=1, max_length=MAX_VALUES)] = [8]
    lora_alpha: Annotated[list[float | str], Field(min_length=1, max_length=MAX_VALUES)] = ["2r"]
    inits: Annotated[list[InitName], Field(min_length=1, max_length=MAX_VALUES)] = ["kaiming"]
    target_modules: Annotated[list[str], Field(min_length=1)] | str = "all-linear"
    lr: LRGrid | None = None
    seeds: Annotated[list[Annotated[int, Field(ge=0)]],
                     Field(min_length=1, max_length=MAX_VALUES)] = [0]
    loraplus_ratio: Annotated[float, Field(gt=0)] = 16.0
    # grid: every trial. transfer: the reference rank over the whole LR grid, the other ranks
    # only at `bracket` grid LRs around muA's prediction, widened while the best is at an edge.
    strategy: Literal["grid", "transfer"] = "grid"
    reference_rank: Annotated[int, Field(gt=0)] | None = None  # default: the middle rank
    bracket: Annotated[int, Field(ge=2)] = 3
    # evaluate every trial at rungs and stop the LRs that cannot be their cell's optimum
    stop_early: StopEarly | None = None
    # Recipe axes: a field of `train` (or train_examples, target_modules) -> the values swept.
    recipe: dict[str, Annotated[list[Any], Field(min_length=1, max_length=MAX_VALUES)]] = Field(
        default_factory=dict)
    # Compare target-module sets at matched trainable-parameter count: each set's rank is scaled
    # so its adapter has as many parameters as the first set's at the rank in `ranks`.
    match_params: bool = False

    _lr_range = field_validator("lr", mode="before")(_lr_grid)

    @field_validator("recipe")
    @classmethod
    def _recipe_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {axis: check_recipe_axis(axis, values) for axis, values in value.items()}

    @field_validator("methods", mode="before")
    @classmethod
    def _names_to_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("lora_alpha", mode="before")
    @classmethod
    def _alpha_list(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        for v in values:
            parse_lora_alpha(v)
        return values

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and value not in TARGET_PRESETS:
            raise ValueError(
                f"'{value}' is not a preset; allowed: {', '.join(TARGET_PRESETS)}, "
                "or a list of module names"
            )
        return value

    @field_validator("ranks", "seeds", "inits")
    @classmethod
    def _no_repeats(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: a value is listed twice")
        return value

    @model_validator(mode="after")
    def _every_method_has_lrs(self) -> SearchSpec:
        alphas = [parse_lora_alpha(a) for a in self.lora_alpha]
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"search.lora_alpha {self.lora_alpha}: a value is listed twice")
        for entry in self.methods:
            if entry.lr is None and self.lr is None:
                raise ValueError(f"method '{entry.name}' has no learning rates: set search.lr")
        if self.reference_rank is not None and self.reference_rank not in self.ranks:
            raise ValueError(f"search.reference_rank {self.reference_rank}: not in search.ranks "
                             f"{self.ranks}")
        if "steps" in self.recipe and "epochs" in self.recipe:
            raise ValueError("search.recipe: sweep steps or epochs, not both")
        if self.match_params and len(self.recipe.get("target_modules", [])) < 2:
            raise ValueError("search.match_params: needs two or more target sets in "
                             "search.recipe.target_modules")
        if "target_modules" in self.recipe and "target_modules" in self.model_fields_set:
            raise ValueError("give target_modules in search or in search.recipe, not both")
        names = [entry.display_name for entry in self.methods]
        if len(set(names)) != len(names):
            raise ValueError("a method is listed twice in search.methods (give each peft entry "
                             "its own label)")
        return self

    def lrs_for(self, entry: MethodEntry) -> list[float]:
        return lr_values(entry.lr if entry.lr is not None else self.lr)


class ResultSpec(_Strict):
    """Where an external command's metric comes from: a JSON file it writes (relative to its
    working folder) or JSON lines on its stdout (the last line with `key` is the result, the
    earlier ones its evaluation curve). `key` is a JSONPath to one value (`eval.accuracy`,
    `results[0].loss`, `"lora:{lr:.3g}".val_loss`: see result_key.py), its names templates."""

    file: str | None = Field(default=None, min_length=1)
    stdout: bool = False
    key: str = Field(min_length=1)

    @field_validator("key")
    @classmethod
    def _key_form(cls, value: str) -> str:
        parse_key(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ResultSpec:
        if (self.file is None) == (not self.stdout):
            raise ValueError("trainer.result: give file (a JSON file the command writes) or "
                             "stdout: true (JSON lines it prints), one of them")
        return self


# The names an external command's templates may use ({lr}, ...): every trial's, an adapter
# cell's, and the study's recipe axes beside them (trainers/command.py gives their values).
TRIAL_TEMPLATE_NAMES = ("lr", "seed", "method", "trial", "out_dir", "study_dir", "python")
ADAPTER_TEMPLATE_NAMES = ("rank", "lora_alpha", "init", "target_modules")


class TrainerSpec(_Strict):
    """An external training command run once per trial in its own working folder.

    `command` is the argument list (no shell), or with `shell: true` one shell line (template
    values quoted); `method_args` are arguments appended for one method (e.g. full:
    [--full-finetune]); `env` is added to the worker's environment. Every argument and value is
    a template: `{lr}`, `{rank}`, ... (TRIAL_TEMPLATE_NAMES, ADAPTER_TEMPLATE_NAMES, recipe
    axes); `{{` and `}}` are literal braces. `study_dir` (the study file's folder unless given)
    is what `{study_dir}` gives, so a command names its script next to the study file.
    """

    command: Annotated[list[str], Field(min_length=1)]
    shell: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    method_args: dict[str, list[str]] = Field(default_factory=dict)
    # files written into the trial's folder before the command runs: name -> a template file
    # (relative to study_dir), e.g. an axolotl config with {lr} in it
    files: dict[str, str] = Field(default_factory=dict)
    result: ResultSpec
    study_dir: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_string(cls, value: Any) -> Any:
        """`command` as one string is the shell line of `shell: true`."""
        if isinstance(value, dict) and isinstance(value.get("command"), str):
            if value.get("shell") is not True:
                raise ValueError("trainer.command: one string is a shell line: set shell: true, "
                                 "or give the argument list ([program, arg, ...])")
            value = {**value, "command": [value["command"]]}
        return value

    @model_validator(mode="after")
    def _shell_line(self) -> TrainerSpec:
        if self.shell and len(self.command) != 1:
            raise ValueError("trainer.command: with shell: true, give one shell line "
                             "(a string, or a list of one string)")
        for name in self.files:
            if Path(name).name != name or name in (".", ".."):
                raise ValueError(f"trainer.files.{name}: a file name in the trial's folder "
                                 "(no folders)")
        return self

    def template_file(self, name: str) -> str:
        """The text of the template file that trainer.files names as `name`."""
        source = Path(self.study_dir or ".") / self.files[name]
        try:
            return source.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"trainer.files.{name}: cannot read {source} "
                             f"({getattr(exc, 'strerror', None) or exc})") from None

    def templates(self, label: str) -> list[tuple[str, str]]:
        """(field, template) of everything rendered for a trial of method `label`."""
        return ([(f"trainer.command[{i}]", text) for i, text in enumerate(self.command)]
                + [(f"trainer.method_args.{label}[{i}]", text)
                   for i, text in enumerate(self.method_args.get(label, []))]
                + [(f"trainer.env.{name}", text) for name, text in self.env.items()]
                + [("trainer.result.key", self.result.key)])


def template_fields(text: str) -> list[str]:
    """The names a template uses; ValueError for a malformed one (a lone brace, {a.b}, {0})."""
    names = []
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"'{{{name}}}' is not a plain name")
        names.append(name)
        if spec and "{" in spec:
            raise ValueError(f"'{{{name}:{spec}}}': a format spec holds no template")
    return names


class Study(_Strict):
    """A whole study file: model, task, train and search; or with `trainer` (an external
    command that loads its own model and data), task (kind external: the metric's name and
    goal) and search only."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Annotated[int, Field(ge=0)] = 0
    model: ModelSpec | None = None
    task: TaskSpec
    train: TrainSpec | None = None
    search: SearchSpec
    trainer: TrainerSpec | None = None
    rl: RLSpec | None = None

    @model_validator(mode="after")
    def _rl_section(self) -> Study:
        if (self.rl is None) != (self.task.kind != "rl"):
            raise ValueError("rl: the section of task.kind rl (group_size, temperature, "
                             "loss_type, ...); give both or neither")
        if self.rl is not None and self.rl.beta > 0:
            self._check_kl_reference()
        task = self.task
        if (self.rl is not None and self.rl.verifier == "math"
                and task.response_field is None and task.answer_field is None):
            raise ValueError("rl.verifier math needs task.answer_field (or a "
                             "task.response_field ending in '#### N') to verify against")
        return self

    def _check_kl_reference(self) -> None:
        """rl.beta > 0 takes the reference log-probs from the trained model with its adapters
        switched off (methods/stacked.adapters_disabled), which is the base only for lorasweep's
        own adapter layers over a base they leave as it was."""
        for entry in self.search.methods:
            spec = variant(entry.name)
            if not spec.is_adapter or spec.strategy == "peft":
                raise ValueError(f"rl.beta: the KL to the base needs the base model beside method "
                                 f"'{entry.display_name}', which keeps no adapter to switch off; "
                                 "set rl.beta: 0 or use an adapter method (lora, rslora, dora, "
                                 "...)")
            for init in entry.inits(self.search.inits):
                if get_init(init).residual:
                    raise ValueError(f"rl.beta: init '{init}' (method '{entry.display_name}') "
                                     "rewrites the base weight, so switching the adapter off "
                                     "does not give the base model; set rl.beta: 0 or use "
                                     "an init that leaves the base as it is: "
                                     + ", ".join(i.name for i in INITS.values()
                                                 if not i.residual))

    @model_validator(mode="after")
    def _one_trainer(self) -> Study:
        external = self.trainer is not None
        if external and self.task.kind != "external":
            raise ValueError("task.kind: a study with a trainer command has task.kind external "
                             "(the command loads its own data)")
        if not external and self.task.kind == "external":
            raise ValueError("task.kind external: needs a trainer command "
                             "(trainer: {command: [...], result: {...}})")
        if not external:
            for name in ("model", "train"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: Field required (or give a trainer command)")
            return self
        if self.search.stop_early is not None:
            raise ValueError("search.stop_early: needs lorasweep's own training (it pauses a "
                             "trial at each rung and probes it), not a trainer command")
        for name in ("model", "train"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: the trainer's command loads and trains its own "
                                 "model; remove it")
        if self.search.match_params:
            raise ValueError("search.match_params: needs the model's layers, which an external "
                             "command keeps to itself")
        return self._check_templates()

    def _check_templates(self) -> Study:
        assert self.trainer is not None
        labels = [entry.display_name for entry in self.search.methods]
        for label in self.trainer.method_args:
            if label not in labels:
                raise ValueError(f"trainer.method_args.{label}: not a method of search.methods "
                                 f"({', '.join(labels)})")
        axes = tuple(self.search.recipe)
        files = [(f"trainer.files.{name}", self.trainer.template_file(name))
                 for name in self.trainer.files]
        for entry in self.search.methods:
            adapter = variant(entry.name).is_adapter
            names = TRIAL_TEMPLATE_NAMES + (ADAPTER_TEMPLATE_NAMES if adapter else ()) + axes
            for where, text in self.trainer.templates(entry.display_name) + files:
                try:
                    used = template_fields(text)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc} (write {{{{ and }}}} for braces)") from None
                for name in used:
                    if name not in names:
                        which = (f"method '{entry.display_name}' has no {{{name}}}; put it in "
                                 "trainer.method_args" if name in ADAPTER_TEMPLATE_NAMES
                                 else f"{{{name}}} is not a template name")
                        raise ValueError(f"{where}: {which}; allowed: "
                                         + ", ".join(f"{{{n}}}" for n in names))
        return self

    @model_validator(mode="after")
    def _evaluations_to_select(self) -> Study:
        if self.trainer is not None:  # the command's evaluations are its own
            return self
        if self.task.select == "best" and not self.train.eval_every:
            raise ValueError("task.select 'best': needs train.eval_every > 0 (the evaluations "
                             "to choose the best from)")
        return self

    @model_validator(mode="after")
    def _quantized_base_stays_frozen(self) -> Study:
        """A 4-bit base can neither train (full fine-tuning) nor take s B0 A0 out of its weights
        exactly (the residual inits): PEFT too refuses PiSSA over a 4-bit weight, and asks for
        the residual model to be made in full precision and quantized afterwards."""
        if self.model is None or self.model.quantize is None:
            return self
        for entry in self.search.methods:
            if not variant(entry.name).is_adapter:
                raise ValueError(f"model.quantize: {self.model.quantize} freezes the base in 4 "
                                 f"bits, so method '{entry.name}' cannot train it; use an "
                                 "adapter method or drop model.quantize")
            for init in entry.inits(self.search.inits):
                if get_init(init).residual:
                    raise ValueError(
                        f"model.quantize: {self.model.quantize} cannot hold init '{init}' "
                        f"(method '{entry.display_name}'): it subtracts s B0 A0 from the base "
                        "weight, which a 4-bit base cannot store exactly (PEFT refuses PiSSA "
                        "over 4-bit weights too); allowed inits: "
                        + ", ".join(i.name for i in INITS.values() if not i.residual))
        return self

    @model_validator(mode="after")
    def _lora_dropout_has_adapters(self) -> Study:
        """lora_dropout drops an adapter's input: full fine-tuning has none. A study that mixes
        methods gives it to its adapter cells; one with no adapter, or one that sweeps it over
        full fine-tuning cells (copies that would differ in nothing), is refused."""
        plain = [e.name for e in self.search.methods if not variant(e.name).is_adapter]
        if plain and "lora_dropout" in self.search.recipe:
            raise ValueError(f"search.recipe.lora_dropout: method '{plain[0]}' has no adapter "
                             "input to drop; sweep lora_dropout in a study of adapter methods")
        if plain and len(plain) == len(self.search.methods) and self.train is not None \
                and self.train.lora_dropout:
            raise ValueError(f"train.lora_dropout {self.train.lora_dropout:g}: method "
                             f"'{plain[0]}' has no adapter; allowed: 0 (train.dropout sets the "
                             "model's own dropout)")
        return self

    @model_validator(mode="after")
    def _swept_batches_split(self) -> Study:
        if self.train is None:
            return self
        for size in self.search.recipe.get("batch_size", []):
            if size % self.train.grad_accum:
                raise ValueError(f"train.grad_accum {self.train.grad_accum} does not divide "
                                 f"search.recipe.batch_size {size}")
        return self


# The train fields a study may sweep in search.recipe (the eval and divergence settings do not
# change what is trained), the training-set size, and the adapted modules.
RECIPE_TRAIN_AXES = ("steps", "epochs", "batch_size", "seq_len", "warmup_ratio", "schedule",
                     "weight_decay", "grad_clip", "adam_beta1", "adam_beta2", "adam_eps",
                     "dropout", "lora_dropout")
# What a field added to `train` since means in a study folder written before it (its study.yaml
# lacks the field): how those trials were trained, which may differ from a new file's default.
STORED_DEFAULTS = {"dropout": "off"}
DATA_AXIS = "train_examples"  # the first N of the seeded shuffle of the training examples
TARGETS_AXIS = "target_modules"
RECIPE_AXES = (*RECIPE_TRAIN_AXES, DATA_AXIS, TARGETS_AXIS)
_AXIS_TYPES = {
    **{name: TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata
                         else info.annotation, config=NO_INF_NAN)
       for name, info in TrainSpec.model_fields.items() if name in RECIPE_TRAIN_AXES},
    DATA_AXIS: TypeAdapter(Annotated[int, Field(gt=0, strict=True)]),
    TARGETS_AXIS: TypeAdapter(Annotated[list[str], Field(min_length=1)] | str),
}


def check_recipe_axis(axis: str, values: list[Any]) -> list[Any]:
    """The values of a recipe axis as their field's type; each must be valid and appear once."""
    if axis not in RECIPE_AXES:
        raise ValueError(f"'{axis}' cannot be swept; allowed: {', '.join(RECIPE_AXES)}")
    checked = []
    for value in values:
        try:
            checked.append(_AXIS_TYPES[axis].validate_python(value))
        except ValidationError as exc:
            raise ValueError(f"{axis} {value!r}: {exc.errors()[0]['msg']}") from None
        if value is None and axis in ("steps", "epochs"):
            raise ValueError(f"{axis}: give numbers")
        if axis == TARGETS_AXIS and isinstance(value, str) and value not in TARGET_PRESETS:
            raise ValueError(f"target_modules '{value}' is not a preset; allowed: "
                             f"{', '.join(TARGET_PRESETS)}, or a list of module names")
    seen = [yaml.safe_dump(v) for v in checked]
    if len(set(seen)) != len(seen):
        raise ValueError(f"{axis} {values}: a value is listed twice")
    return checked


def parse_lora_alpha(value: float | str) -> tuple[str, float]:
    """`16` means a constant lora_alpha; `"2r"` means lora_alpha = 2 x rank.

    Returns ("constant", 16.0) or ("per_rank", 2.0).
    """
    if isinstance(value, bool):
        raise ValueError(f"lora_alpha {value!r}: a number (constant) or 'Nr' (N x rank)")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"lora_alpha {value}: a number (constant) or 'Nr' (N x rank)")
        if value <= 0:
            raise ValueError(f"lora_alpha {value}: must be positive")
        return ("constant", float(value))
    text = str(value).strip()
    if text.endswith("r"):
        factor = text[:-1] or "1"
        try:
            number = float(factor)
        except ValueError:
            number = -1.0
        if 0 < number < math.inf:
            return ("per_rank", number)
    raise ValueError(f"lora_alpha '{value}': a number (constant) or 'Nr' (N x rank), e.g. '2r'")


def alpha_value(spec: float | str, rank: int) -> float:
    """The lora_alpha that a spec gives at a rank."""
    mode, number = parse_lora_alpha(spec)
    return number * rank if mode == "per_rank" else number


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


# The offending value as the error shows it: cut short, so a huge value stays one short line.
SHORT_REPR = reprlib.Repr()  # keyword settings need Python 3.12
SHORT_REPR.maxlevel, SHORT_REPR.maxlist, SHORT_REPR.maxdict = 2, 6, 4
SHORT_REPR.maxstring = SHORT_REPR.maxother = 60


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a pydantic error as `field.path: what is wrong (got X)`."""
    error = exc.errors()[0]
    location = ".".join(
        str(part)
        for part in error["loc"]
        if not str(part).startswith(("function-", "list[", "constrained-"))
        and str(part) not in {"LRRange", "float", "str", "int"}
    )
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if error["type"] in {"missing", "value_error"} or isinstance(got, dict) else (
        f" (got {SHORT_REPR.repr(got)})"
    )
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    if location and message.startswith(f"{location}."):  # a section's check names its field
        return f"{message}{shown}{more}"
    return f"{location or 'study'}: {message}{shown}{more}"


def dump_study(study: Study) -> str:
    """The resolved study as YAML, every default written out."""
    return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)


# PEFT configs nested in another, which a study file gives as mappings.
NESTED_PEFT_CONFIGS = {"eva_config": "EvaConfig", "corda_config": "CordaConfig",
                       "lora_ga_config": "LoraGAConfig", "loftq_config": "LoftQConfig"}


def build_peft_config(class_name: str, arguments: dict[str, Any]) -> Any:
    """The PEFT config object a study's `peft_config` and `peft:` arguments describe."""
    import peft

    config_class = getattr(peft, class_name, None)
    if not (isinstance(config_class, type) and issubclass(config_class, peft.PeftConfig)):
        raise ValueError(f"peft_config '{class_name}' is not a PEFT config class (e.g. LoraConfig)")
    from peft.tuners.lora import config as lora_configs  # where CorDA's config lives

    built = {name: getattr(lora_configs, NESTED_PEFT_CONFIGS[name])(**value)
             if name in NESTED_PEFT_CONFIGS and isinstance(value, dict) else value
             for name, value in arguments.items()}
    return config_class(**built)


def check_peft_arguments(class_name: str, arguments: dict[str, Any]) -> None:
    """Build the PEFT config once so an unknown class or argument is caught at load time."""
    try:
        build_peft_config(class_name, arguments)
    except (TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0]
        if message.startswith("peft_config"):
            raise
        raise ValueError(f"peft: {class_name} rejects these arguments: {message}") from None
