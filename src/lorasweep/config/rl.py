"""The study file's `rl` section (task.kind rl): how each step samples and scores completions,
and the rules that tie it to the task and the methods."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from lorasweep.config.base import STRICT
from lorasweep.config.search import SearchSpec
from lorasweep.config.task import TaskSpec
from lorasweep.kinds import kind_of
from lorasweep.variants import INITS, get_init, variant


class RLSpec(BaseModel):
    """task.kind rl: how each step samples and scores completions and makes them a loss
    (tasks/grpo.py's `Objective`, whose fields carry the same names; TRL's GRPOConfig in
    brackets). Each step takes train.batch_size prompts and samples `group_size` completions of
    each from the trial's own policy; `verifier` scores them (tasks/verifiers.py; math: 1 for
    the right number as the math task extracts it, else 0; code: 1 when the completion passes the
    record's HumanEval-style tests in the sandbox, with task.execute_code's opt-in)."""

    model_config = STRICT

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


def check_rl(rl: RLSpec | None, task: TaskSpec, search: SearchSpec) -> None:
    """The rl section goes with (and only with) task.kind rl, and can score its data."""
    if (rl is None) != (kind_of(task.kind).section != "rl"):
        raise ValueError("rl: the section of task.kind rl (group_size, temperature, "
                         "loss_type, ...); give both or neither")
    if rl is not None and rl.beta > 0:
        _check_kl_reference(search)
    if (rl is not None and rl.verifier == "math"
            and task.response_field is None and task.answer_field is None):
        raise ValueError("rl.verifier math needs task.answer_field (or a "
                         "task.response_field ending in '#### N') to verify against")


def _check_kl_reference(search: SearchSpec) -> None:
    """rl.beta > 0 takes the reference log-probs from the trained model with its adapters
    switched off (methods/stacked.adapters_disabled), which is the base only for lorasweep's
    own adapter layers over a base they leave as it was."""
    for entry in search.methods:
        spec = variant(entry.name)
        if not spec.is_adapter or spec.strategy == "peft":
            raise ValueError(f"rl.beta: the KL to the base needs the base model beside method "
                             f"'{entry.display_name}', which keeps no adapter to switch off; "
                             "set rl.beta: 0 or use an adapter method (lora, rslora, dora, "
                             "...)")
        for init in entry.inits(search.inits):
            if get_init(init).residual:
                raise ValueError(f"rl.beta: init '{init}' (method '{entry.display_name}') "
                                 "rewrites the base weight, so switching the adapter off "
                                 "does not give the base model; set rl.beta: 0 or use "
                                 "an init that leaves the base as it is: "
                                 + ", ".join(i.name for i in INITS.values()
                                             if not i.residual))
