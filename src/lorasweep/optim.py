"""AdamW over K trials at once, each with its own LR, and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

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


def build_schedule(optimizer: torch.optim.Optimizer, train: TrainSpec,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over warmup_ratio of the steps, then cosine or linear decay to zero."""
    warmup = math.ceil(train.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return get_scheduler(name[train.schedule], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def total_steps(train: TrainSpec, train_size: int) -> int:
    if train.steps is not None:
        return train.steps
    assert train.epochs is not None
    # batch_order drops each epoch's last partial batch, so an epoch is this many steps
    return max(1, round(train.epochs * max(1, train_size // train.batch_size)))
