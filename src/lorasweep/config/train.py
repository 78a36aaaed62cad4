"""The study file's `train` section: the training recipe every trial of the study shares."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from lorasweep.config.base import STRICT


def _yaml_off(value: Any) -> Any:
    """YAML reads a bare `off` as false: `dropout: off` means the word."""
    return "off" if value is False else value


class TrainSpec(BaseModel):
    """The training recipe shared by every trial of the study."""

    model_config = STRICT

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

