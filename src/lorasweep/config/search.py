"""The study file's `search` section: the axes swept (methods and their LR grids, ranks,
lora_alpha, inits, seeds, recipe axes) and how the sweep spends its trials."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lorasweep.config.base import MAX_VALUES, NO_INF_NAN, STRICT, OneOf
from lorasweep.config.error_text import describe_validation_error
from lorasweep.config.train import TrainSpec
from lorasweep.peft_config import build_peft_config
from lorasweep.variants import VARIANTS, get_init, init_pattern, variant

TARGET_PRESETS = ("attention", "mlp", "all-linear")
# A vision-language model's parts (methods/targets.part_of), named alone or joined by "+" as a
# target_modules value: "language", "language+projector", "language+projector+vision".
PARTS = ("language", "projector", "vision")
REGEX_PREFIX = "re:"  # a target_modules entry "re:<pattern>" full-matches layers' names


def is_parts(value: object) -> bool:
    """Whether a target_modules value names parts of a vision-language model."""
    if not isinstance(value, str):
        return False
    parts = value.split("+")
    return len(set(parts)) == len(parts) and set(parts) <= set(PARTS)


def check_targets(value: list[str] | str) -> list[str] | str:
    """A target_modules value: a preset, parts, or a list of layer names and `re:` patterns."""
    if isinstance(value, str):
        if value not in TARGET_PRESETS and not is_parts(value):
            raise ValueError(f"target_modules '{value}' is not a preset; allowed: "
                             f"{', '.join(TARGET_PRESETS)}, parts of a vision-language model "
                             f"({', '.join(PARTS)}, joined by '+'), or a list of module names "
                             f"and '{REGEX_PREFIX}<pattern>' entries")
        return value
    for entry in value:
        if entry.startswith(REGEX_PREFIX) and "," in entry:  # a cell keeps its list comma-joined
            raise ValueError(f"target_modules entry '{entry}': a pattern cannot hold a comma "
                             "(write {m,n} as a repetition)")
        if entry.startswith(REGEX_PREFIX):
            try:
                re.compile(entry[len(REGEX_PREFIX):])
            except re.error as exc:
                raise ValueError(f"target_modules entry '{entry}' is not a regular "
                                 f"expression: {exc}") from None
    return value


class LRRange(BaseModel):
    """A log-spaced grid: `per_decade` points per factor of ten from `low` to `high` inclusive."""

    model_config = STRICT

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


InitName = Annotated[str, AfterValidator(_known_init)]


class MethodEntry(BaseModel):
    """A method in the search space, optionally with its own LR grid (full FT wants lower LRs)
    and its own init (e.g. `{name: pissa, init: pissa_niter_4}`)."""

    model_config = STRICT

    name: Annotated[str, AfterValidator(OneOf(VARIANTS))]
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


class StopEarly(BaseModel):
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

    model_config = STRICT

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


class SearchSpec(BaseModel):
    """The axes swept: every combination of these (and each LR and seed) is one trial."""

    model_config = STRICT

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
        return check_targets(value)

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


# The train fields a study may sweep in search.recipe (the eval and divergence settings do not
# change what is trained), the training-set size, and the adapted modules.
RECIPE_TRAIN_AXES = ("steps", "epochs", "batch_size", "seq_len", "warmup_ratio", "schedule",
                     "weight_decay", "grad_clip", "adam_beta1", "adam_beta2", "adam_eps",
                     "dropout", "lora_dropout")
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
        if axis == TARGETS_AXIS:
            check_targets(value)
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


def check_peft_arguments(class_name: str, arguments: dict[str, Any]) -> None:
    """Build the PEFT config once so an unknown class or argument is caught at load time."""
    try:
        build_peft_config(class_name, arguments)
    except (TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0]
        if message.startswith("peft_config"):
            raise
        raise ValueError(f"peft: {class_name} rejects these arguments: {message}") from None
