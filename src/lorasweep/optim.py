"""AdamW over K trials at once, each with its own LR, the warmup + decay schedule, and the rungs
where search.stop_early evaluates a trial (with the schedule of their decay probes)."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler, get_wsd_schedule

from lorasweep.config import TrainSpec
from lorasweep.methods import Attached, Method
from lorasweep.space import TrialSpec


def build_optimizer(method: Method, attached: Attached, trials: list[TrialSpec],
                    train: TrainSpec) -> torch.optim.AdamW:
    """One AdamW whose parameter groups carry each trial's LR; trials never share a tensor."""
    groups = []
    for trial, params in zip(trials, attached.trial_params, strict=True):
        groups += method.param_groups(params, trial.lr, trial.cell, train.weight_decay)
    # foreach=False: the per-parameter loop gives bit-identical steps whether a trial is alone
    # or in a group (the multi-tensor path may batch tensors differently).
    return torch.optim.AdamW(groups, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_eps, foreach=False)


def warmup_steps(train: TrainSpec, total_steps: int) -> int:
    return math.ceil(train.warmup_ratio * total_steps)


def build_schedule(optimizer: torch.optim.Optimizer, train: TrainSpec,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over warmup_ratio of the steps, then cosine or linear decay to zero, a
    constant LR, or (wsd) a constant plateau and a linear cooldown over the last decay_ratio."""
    warmup = warmup_steps(train, total_steps)
    if train.schedule == "wsd":
        decay = min(max(1, round(train.decay_ratio * total_steps)), total_steps - warmup)
        return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                num_training_steps=total_steps, decay_type="linear")
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return get_scheduler(name[train.schedule], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def rung_steps(fractions: list[float], train: TrainSpec, total_steps: int) -> list[int]:
    """The steps at which search.stop_early evaluates a trial of `total_steps` steps; a
    one-line ValueError where a rung falls in the warmup (whose LRs are not yet the trial's),
    at the end, or on the same step as another."""
    steps = [round(f * total_steps) for f in fractions]
    first = max(1, warmup_steps(train, total_steps))
    for fraction, step in zip(fractions, steps, strict=True):
        if not first <= step < total_steps:
            raise ValueError(f"rung {fraction:g} of {total_steps} steps is step {step}: a rung "
                             f"lies between the warmup's end (step {first}) and the last step")
    if len(set(steps)) != len(steps):
        raise ValueError(f"rungs {fractions} of {total_steps} steps fall on steps {steps}: "
                         "two on one step; train longer or give fewer rungs")
    return steps


def probe_steps(cooldown: float, rung: int) -> int:
    """The decay probe's length at a rung: `cooldown` x the rung's step, at least one step.

    With the wsd schedule a probe at step s is, step for step, the run of s + probe_steps steps
    whose plateau ends at s (as Hagele et al. 2024 read a WSD run off its plateau)."""
    return max(1, round(cooldown * rung))


def probe_factor(step: int, length: int) -> float:
    """The LR of the probe's `step`-th step (1-based) as a fraction of the schedule's LR at the
    rung: a linear fall to zero, the wsd schedule's cooldown (transformers' get_wsd_schedule)."""
    return 1.0 - (step - 1) / length


def total_steps(train: TrainSpec, train_size: int) -> int:
    if train.steps is not None:
        return train.steps
    assert train.epochs is not None
    # batch_order drops each epoch's last partial batch, so an epoch is this many steps
    return max(1, round(train.epochs * max(1, train_size // train.batch_size)))
