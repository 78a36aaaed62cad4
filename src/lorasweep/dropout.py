"""Dropout while training, as the Hugging Face Trainer and PEFT apply it, and exact in fused groups.

`train.dropout: model` trains with the model's own dropout on (its config's hidden, attention and
classifier dropout), `off` keeps the model in eval mode; `train.lora_dropout` drops the adapter's
input only (PEFT's `lora_B(lora_A(dropout(x)))`), whatever `train.dropout` says.

A fused group holds K trials that share cell, seed and data order; its batch is K copies of the
data laid end to end. For each trial to draw the masks it draws alone, every dropout draws the
mask of ONE trial's rows (shape (b, ...)) and tiles it K times. The draw is the one torch's CPU
dropout makes (`empty_like(x).bernoulli_(1 - p).div_(1 - p)`, then `x * mask`), from the global
generator, so with K = 1 the numbers are bit for bit those of a plain run, and torch's
checkpointing (which restores the global generator for its recomputation) redraws the same
masks. Each step starts from `torch.manual_seed(step_seed(seed, step))`.

The draws are taken over with a TorchFunctionMode rather than by replacing modules: it reaches
every dropout the model makes, nn.Dropout modules, eager attention's functional dropout and the
dropout inside scaled_dot_product_attention alike, in any architecture. Stochastic depth (drop
path: Swin, BEiT, ConvNeXt, ... keep or drop a whole residual branch per example) draws
`torch.rand((rows, 1, ..., 1))`; that draw too is one trial's rows, tiled.

Norms that compute batch statistics (BatchNorm) cannot be made exact this way: in train mode they
would normalize over the K trials' rows together and mix their running statistics, so
`check_norms` refuses them where they would run so (tests/test_vision_zoo.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from transformers.modeling_layers import GradientCheckpointingLayer

from lorasweep.config import TrainSpec
from lorasweep.errors import StudyError
from lorasweep.methods.stacked import StackedLoRALinear

DROPOUT_STREAM = 1  # SeedSequence spawn key of the dropout stream (the init draws from the seed)

# Dropouts that draw a mask of another shape than their input's: not tiled here, so refused.
UNTILED = (F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def step_seed(seed: int, step: int) -> int:
    """The seed of a trial's dropout masks at `step` (1-based): numpy's SeedSequence of
    (trial seed, step) on its own spawn key, so it never coincides with an init's seed."""
    sequence = np.random.SeedSequence([seed, step], spawn_key=(DROPOUT_STREAM,))
    return int(sequence.generate_state(1)[0])


def drop(x: torch.Tensor, p: float, k: int, inplace: bool = False) -> torch.Tensor:
    """x times a dropout mask drawn for one trial's rows and tiled over the K trials."""
    if p == 0:
        return x
    if p == 1:
        return x.mul_(0) if inplace else x * torch.zeros((), dtype=x.dtype, device=x.device)
    if x.shape[0] % k:
        raise RuntimeError(f"dropout over {x.shape[0]} rows cannot be split among {k} trials")
    rows = x[:x.shape[0] // k]
    mask = torch.empty_like(rows).bernoulli_(1 - p).div_(1 - p)
    if k > 1:
        mask = mask.repeat(k, *[1] * (x.ndim - 1))
    return x.mul_(mask) if inplace else x * mask


def per_row_draw(size: tuple[int, ...], k: int, kwargs: dict) -> torch.Tensor:
    """A drop path's uniform draw of shape (K*b, 1, ..., 1): trial 0's b values, tiled."""
    rows = torch.rand((size[0] // k, *size[1:]), **kwargs)
    return rows.repeat(k, *[1] * (len(size) - 1))


def _size(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """torch.rand's shape, given as one sequence or as separate ints."""
    size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int)
                      else args)
    return tuple(size) if all(isinstance(d, int) for d in size) else None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
              *, k: int) -> torch.Tensor:
    """scaled_dot_product_attention with its dropout drawn by `drop` (the kernel draws inside,
    where masks cannot be tiled): torch's reference formula, softmax then dropout."""
    scale = query.size(-1) ** -0.5 if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        length, width = query.size(-2), key.size(-2)
        attn_mask = torch.ones(length, width, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        scores = (scores.masked_fill(attn_mask.logical_not(), float("-inf"))
                  if attn_mask.dtype == torch.bool else scores + attn_mask)
    return drop(torch.softmax(scores, dim=-1), dropout_p, k) @ value


class TiledDropout(TorchFunctionMode):
    """While active, every dropout draws one trial's mask and tiles it over `k` trials.

    Hold it over the forward AND the backward: checkpointed blocks recompute their forward
    during the backward.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout:
            bound = _bind(("input", "p", "training", "inplace"), (None, 0.5, True, False),
                          args, kwargs)
            if not bound["training"]:
                return bound["input"]
            return drop(bound["input"], bound["p"], self.k, bound["inplace"])
        if func is torch.rand and self.k > 1:
            size = _size(args, kwargs)
            if size and len(size) > 1 and size[0] % self.k == 0 and set(size[1:]) == {1}:
                return per_row_draw(size, self.k, {n: v for n, v in kwargs.items()
                                                  if n != "size"})
        if func is F.scaled_dot_product_attention and kwargs.get(
                "dropout_p", args[4] if len(args) > 4 else 0.0) > 0:
            return attention(*args, **kwargs, k=self.k)
        if func in UNTILED and _bind(("input", "p", "training"), (None, 0.5, False), args,
                                     kwargs)["training"]:
            raise RuntimeError(f"{func.__name__} is not supported while training with "
                               "dropout; set train.dropout: off")
        return func(*args, **kwargs)


def _bind(names: tuple[str, ...], defaults: tuple, args: tuple, kwargs: dict) -> dict:
    """A functional dropout's arguments by name (they may come positionally or by keyword)."""
    values = dict(zip(names, defaults, strict=True))
    values.update(zip(names, args, strict=False))
    values.update({n: v for n, v in kwargs.items() if n in values})
    return values


def check_norms(model: nn.Module, train: TrainSpec) -> None:
    """Refuse a norm that would normalize over a fused group's rows together: BatchNorm in train
    mode (`train.dropout: model`), or one that keeps no running statistics at all. With
    `train.dropout: off` the others use their pretrained running statistics, per example."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (train.dropout == "model"
                                               or not module.track_running_stats):
            fix = ("set train.dropout: off (its running statistics then stay as loaded, "
                   "as when fine-tuning with frozen norms)" if module.track_running_stats
                   else "it keeps no running statistics, so no mode avoids that")
            raise StudyError(f"train.dropout: {train.dropout}: layer {name} "
                             f"({type(module).__name__}) would normalize over all trials of a "
                             f"fused group at once and mix their statistics; {fix}")


def set_training(model: nn.Module, train: TrainSpec) -> None:
    """The mode a training step runs in: the whole model in train mode with `dropout: model`;
    with `off` in eval mode but for the adapter layers (their lora_dropout) and the
    checkpointed blocks (transformers recomputes a block only while it is in train mode)."""
    if train.dropout == "model":
        model.train()
        return
    model.eval()
    for module in model.modules():
        if isinstance(module, StackedLoRALinear | LoraLayer):  # lorasweep's adapters, PEFT's
            module.train()
        elif isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True
