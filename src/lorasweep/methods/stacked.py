"""Layers that hold K trials' weights side by side over one frozen base.

The batch that reaches a stacked layer is K copies of the data laid end to end along the first
dimension (trial 0's rows, then trial 1's, ...). Each layer splits it into K slices and applies
trial k's weights to slice k with the same `F.linear` calls a single run (and PEFT) makes, so a
trial computes the same numbers alone or in a group; K = 1 is the ordinary single run. A batched
matmul (bmm) would round differently from PEFT's, and Adam's sign-like first steps amplify such
rounding into visible differences within a few steps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorasweep.methods.targets import layer_shape, out_in_weight


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out, in) matrix: a view of a Conv1D's transposed weight (so
    in-place edits reach the layer), or dequantized from a 4-bit base (quantize.py), as PEFT's
    DoRA and OLoRA do."""
    quant_state = getattr(layer.weight, "quant_state", None)
    if quant_state is None:
        return out_in_weight(layer)
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, quant_state)


def split_trials(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(K*b, ...) -> K views of (b, ...): one row block per trial."""
    return x.chunk(k, dim=0)


def join_trials(parts: list[torch.Tensor]) -> torch.Tensor:
    """K row blocks back into one (K*b, ...) tensor; one trial's block as it is (torch.cat
    copies even a single tensor: a copy of every adapted layer's output at each step)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class StackedLoRALinear(nn.Module):
    """y = W x + s * B_k A_k dropout(x) for the rows of trial k; W is the shared, frozen base
    layer. The dropout (`lora_dropout`, in train mode only) is PEFT's: on the adapter's input
    only; under dropout.TiledDropout the K trials' rows get the same mask.

    The base is an nn.Linear or a Conv1D: A (r, in) and B (out, r) have the same shapes for both
    (PEFT's fan_in_fan_out only transposes W), so only code that reads W itself orients it.
    """

    def __init__(self, base: nn.Module, rank: int, k: int, scale: float,
                 lora_dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.k = k
        self.rank = rank
        self.scale = scale
        self.lora_dropout = lora_dropout
        self.disabled = False  # adapters_disabled: the base layer alone
        n_out, n_in = layer_shape(base)
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(rank, n_in)) for _ in range(k))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(n_out, rank)) for _ in range(k))

    def set_init(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Give every trial the same starting A and B (trials of a group share their seed)."""
        with torch.no_grad():
            for pa, pb in zip(self.lora_A, self.lora_B, strict=True):
                pa.copy_(a)
                pb.copy_(b)

    def trial_params(self, name: str, i: int) -> list[tuple[str, nn.Parameter]]:
        """Trial i's trainable weights, named after the module."""
        return [(f"{name}.lora_A", self.lora_A[i]), (f"{name}.lora_B", self.lora_B[i])]

    def dropped(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapter's input after lora_dropout, in the adapter's dtype (cast first, as PEFT
        does); None when no dropout applies (not training, or lora_dropout 0)."""
        if not (self.training and self.lora_dropout):
            return None
        return F.dropout(x.to(self.lora_A[0].dtype), self.lora_dropout, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled:
            return result
        dropped = self.dropped(x)
        inputs = x if dropped is None else dropped
        delta = join_trials([F.linear(F.linear(xk.to(a.dtype), a), b) * self.scale
                             for xk, a, b in zip(split_trials(inputs, self.k), self.lora_A,
                                                 self.lora_B, strict=True)])
        return result + delta.to(result.dtype)


class StackedDoRALinear(StackedLoRALinear):
    """DoRA: y = (m / ||W + s B A||_row) * (W + s B A) x + bias, the norm detached from the graph
    (as the DoRA paper and PEFT do), one magnitude vector m per trial.

    Written as PEFT writes it: base(x) + (m/norm - 1) * W x + (m/norm) * s * B A x; with
    lora_dropout, PEFT drops x in both terms (W x becomes W dropout(x), with no bias). A weight row
    whose norm is zero would divide by zero; norms are clamped at NORM_EPS instead, which changes
    nothing for any row with a norm above it.
    """

    NORM_EPS = 1e-12

    def __init__(self, base: nn.Module, rank: int, k: int, scale: float,
                 lora_dropout: float = 0.0) -> None:
        super().__init__(base, rank, k, scale, lora_dropout)
        self.magnitude = nn.ParameterList(
            nn.Parameter(torch.zeros(layer_shape(base)[0])) for _ in range(k))

    def weight_norm(self, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row norms of W + s B A, with W the (dequantized) base weight `base`."""
        weight = base + self.scale * (b @ a).detach()
        return torch.linalg.norm(weight, dim=1).clamp(min=self.NORM_EPS).detach()

    def set_init(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().set_init(a, b)
        with torch.no_grad():
            norm = self.weight_norm(dense_weight(self.base), a, b)
            for magnitude in self.magnitude:
                magnitude.copy_(norm)

    def trial_params(self, name: str, i: int) -> list[tuple[str, nn.Parameter]]:
        return [*super().trial_params(name, i), (f"{name}.lora_magnitude", self.magnitude[i])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.disabled:
            return result
        base = dense_weight(self.base)  # dequantized once for the K trials
        dropped = self.dropped(x)
        if dropped is None:
            inputs, plain = x, (result if self.base.bias is None else result - self.base.bias)
        else:
            inputs, plain = dropped, F.linear(dropped, base.to(dropped.dtype))
        deltas = []
        for xk, wk, a, b, m in zip(split_trials(inputs, self.k), split_trials(plain, self.k),
                                   self.lora_A, self.lora_B, self.magnitude, strict=True):
            ratio = m / self.weight_norm(base, a, b)
            lora = F.linear(F.linear(xk.to(a.dtype), a), b)
            deltas.append((ratio - 1) * wk + ratio * lora * self.scale)
        return result + join_trials(deltas).to(result.dtype)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model as its base computes it: every stacked adapter layer returns its base layer's
    output (RL's reference policy, with no second copy of the base). Only a base that the
    adapters leave untouched is the base model: not under a residual init (PiSSA and the like
    rewrite W), config.py refuses that pairing."""
    layers = [m for m in model.modules() if isinstance(m, StackedLoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


class StackedLinear(nn.Module):
    """K independent, fully trainable fp32 copies of a linear layer (the task head of each
    trial), fed in fp32 whatever dtype the frozen base computes in."""

    def __init__(self, template: nn.Linear, k: int) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.ParameterList(
            nn.Parameter(template.weight.detach().float().clone()) for _ in range(k))
        self.bias = None if template.bias is None else nn.ParameterList(
            nn.Parameter(template.bias.detach().float().clone()) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = self.bias if self.bias is not None else [None] * self.k
        return join_trials([F.linear(xk.to(w.dtype), w, b) for xk, w, b in
                            zip(split_trials(x, self.k), self.weight, biases, strict=True)])


class StackedCopies(nn.Module):
    """K independent, fully trainable fp32 copies of a head layer that is not a linear one (a
    norm inside the task head, as LeViT's), each applied to its trial's rows: PEFT's
    modules_to_save trains every weight of the head, and so does each trial here."""

    def __init__(self, template: nn.Module, k: int) -> None:
        super().__init__()
        self.k = k
        self.copies = nn.ModuleList(copy.deepcopy(template).float().requires_grad_()
                                    for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return join_trials([layer(xk.float()) for layer, xk in
                            zip(self.copies, split_trials(x, self.k), strict=True)])
