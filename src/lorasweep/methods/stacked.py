"""Layers that hold K trials' weights side by side over one frozen base.

The batch that reaches a stacked layer is K copies of the data laid end to end along the first
dimension (trial 0's rows, then trial 1's, ...). Each layer splits it into K slices and applies
trial k's weights to slice k with the same `F.linear` calls a single run (and PEFT) makes, so a
trial computes the same numbers alone or in a group; K = 1 is the ordinary single run. A batched
matmul (bmm) would round differently from PEFT's, and Adam's sign-like first steps amplify such
rounding into visible differences within a few steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_trials(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(K*b, ...) -> K views of (b, ...): one row block per trial."""
    return x.chunk(k, dim=0)


class StackedLoRALinear(nn.Module):
    """y = W x + s * B_k A_k x for the rows of trial k; W is the shared, frozen base layer."""

    def __init__(self, base: nn.Linear, rank: int, k: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.k = k
        self.rank = rank
        self.scale = scale
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(rank, base.in_features)) for _ in range(k))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(base.out_features, rank)) for _ in range(k))

    def set_init(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Give every trial the same starting A and B (trials of a group share their seed)."""
        with torch.no_grad():
            for pa, pb in zip(self.lora_A, self.lora_B, strict=True):
                pa.copy_(a)
                pb.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        delta = torch.cat([F.linear(F.linear(xk.to(a.dtype), a), b) * self.scale
                           for xk, a, b in zip(split_trials(x, self.k), self.lora_A, self.lora_B,
                                               strict=True)])
        return result + delta.to(result.dtype)


class StackedLinear(nn.Module):
    """K independent, fully trainable copies of a linear layer (the task head of each trial)."""

    def __init__(self, template: nn.Linear, k: int) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.ParameterList(
            nn.Parameter(template.weight.detach().clone()) for _ in range(k))
        self.bias = None if template.bias is None else nn.ParameterList(
            nn.Parameter(template.bias.detach().clone()) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = self.bias if self.bias is not None else [None] * self.k
        return torch.cat([F.linear(xk, w, b) for xk, w, b in
                          zip(split_trials(x, self.k), self.weight, biases, strict=True)])
