"""The whole study file, `Study`: its sections, and the rules that tie one section to another
(the rl section to the kind, a trainer command to what it replaces, a 4-bit base to the methods
that can train over it, ...)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from lorasweep.config.base import STRICT
from lorasweep.config.model import ModelSpec
from lorasweep.config.rl import RLSpec, check_rl
from lorasweep.config.search import SearchSpec
from lorasweep.config.task import TaskSpec
from lorasweep.config.track import TrackSpec
from lorasweep.config.train import TrainSpec
from lorasweep.config.trainer import TrainerSpec, check_templates
from lorasweep.kinds import kind_of
from lorasweep.variants import INITS, get_init, variant


class Study(BaseModel):
    """A whole study file: model, task, train and search; or with `trainer` (an external
    command that loads its own model and data), task (kind external: the metric's name and
    goal) and search only."""

    model_config = STRICT

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Annotated[int, Field(ge=0)] = 0
    model: ModelSpec | None = None
    task: TaskSpec
    train: TrainSpec | None = None
    search: SearchSpec
    trainer: TrainerSpec | None = None
    rl: RLSpec | None = None
    # each finished trial also logged as a run to MLflow or trackio (docs: Watching a study)
    track: TrackSpec | None = None

    @model_validator(mode="after")
    def _rl_section(self) -> Study:
        check_rl(self.rl, self.task, self.search)
        return self

    @model_validator(mode="after")
    def _one_trainer(self) -> Study:
        external = self.trainer is not None
        if external and not kind_of(self.task.kind).external:
            raise ValueError("task.kind: a study with a trainer command has task.kind external "
                             "(the command loads its own data)")
        if not external and kind_of(self.task.kind).external:
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
        check_templates(self.trainer, self.search)
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

