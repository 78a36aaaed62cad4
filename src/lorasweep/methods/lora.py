"""LoRA and the variants that differ in scale (rsLoRA), init (gaussian, muA, PiSSA, MiLoRA, OLoRA,
Init[AB]) or LR (LoRA+).

y = W_res x + s * B A x, with s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). Random inits
follow Hugging Face PEFT (kaiming-uniform A with a = sqrt(5); gaussian A ~ N(0, 1/r^2)) and the
muA paper (Init[A]: A ~ N(0, 1/n), B = 0; Init[B]: A = 0, B ~ N(0, 1/r)). Inits built from W
(PiSSA: top-r SVD; MiLoRA: bottom-r SVD; OLoRA: QR) or random in both factors (Init[AB]) set
W_res = W - s B A so the model is unchanged at step 0; `random_ab` skips that subtraction, the
control showing that random A and B alone destroy the pretrained function.

Trials of a group share their seed, hence their init, hence W_res: the group's copy of the base
carries it, and no per-trial correction is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorasweep.config import subtracts_from_base
from lorasweep.methods.base import (
    Attached,
    Batches,
    Method,
    NamedParams,
    decay_groups,
    stack_head,
)
from lorasweep.methods.stacked import StackedDoRALinear, StackedLoRALinear, dense_weight
from lorasweep.methods.targets import replace_module, resolve_targets
from lorasweep.space import Cell


@dataclass
class Factors:
    """Starting A (r, n_in) and B (n_out, r) of one layer."""

    a: torch.Tensor
    b: torch.Tensor


def _kaiming(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default A: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(cols))."""
    out = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out


def _svd_factors(weight: torch.Tensor, rank: int, scale: float, init: str) -> Factors:
    """PiSSA (top-r) or MiLoRA (bottom-r) singular triplets, split as PEFT does for PiSSA:
    A = sqrt(S/s) V^T, B = U sqrt(S/s), so that s B A is the rank-r part of W."""
    if init.startswith("pissa_niter_"):
        u, s, v = torch.svd_lowrank(weight, rank, niter=int(init.removeprefix("pissa_niter_")))
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        keep = slice(0, rank) if init == "pissa" else slice(s.shape[0] - rank, s.shape[0])
        u, s, vh = u[:, keep], s[keep], vh[keep]
    root = torch.sqrt(s / scale)
    return Factors(a=torch.diag(root) @ vh, b=u @ torch.diag(root))


def initial_factors(init: str, rank: int, weight: torch.Tensor, scale: float,
                    generator: torch.Generator) -> Factors:
    """The starting factors of one layer with weight W (n_out, n_in)."""
    n_out, n_in = weight.shape
    zeros_a, zeros_b = torch.zeros(rank, n_in), torch.zeros(n_out, rank)
    if init == "kaiming":
        return Factors(_kaiming(rank, n_in, generator), zeros_b)
    if init == "gaussian":
        return Factors(zeros_a.normal_(0.0, 1.0 / rank, generator=generator), zeros_b)
    if init == "mua_a":
        return Factors(zeros_a.normal_(0.0, 1.0 / math.sqrt(n_in), generator=generator), zeros_b)
    if init == "mua_b":
        return Factors(zeros_a, zeros_b.normal_(0.0, 1.0 / math.sqrt(rank), generator=generator))
    if init in ("init_ab", "random_ab"):
        a = _kaiming(rank, n_in, generator)
        return Factors(a, _kaiming(n_out, rank, generator))
    if init == "olora":
        q, r = torch.linalg.qr(weight.float())
        return Factors(a=r[:rank].contiguous(), b=q[:, :rank].contiguous())
    if init in ("pissa", "milora") or init.startswith("pissa_niter_"):
        if rank > min(n_out, n_in):
            raise ValueError(f"rank {rank} exceeds the layer's size {n_out}x{n_in}")
        return _svd_factors(weight.float(), rank, scale, init)
    raise ValueError(f"unknown init '{init}'")


class LoRA(Method):
    """Plain LoRA; `rank_scaling="sqrt"` makes it rsLoRA."""

    def __init__(self, rank_scaling: str = "linear") -> None:
        self.rank_scaling = rank_scaling

    def scale(self, cell: Cell) -> float:
        assert cell.rank is not None and cell.alpha is not None
        divisor = math.sqrt(cell.rank) if self.rank_scaling == "sqrt" else cell.rank
        return cell.alpha / divisor

    layer_class: type[StackedLoRALinear] = StackedLoRALinear

    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator,
               batches: Batches | None = None) -> Attached:
        assert cell.rank is not None and cell.init is not None and cell.target_modules
        for param in model.parameters():
            param.requires_grad_(False)
        per_trial = stack_head(model, k, generator)
        scale = self.scale(cell)
        for name in resolve_targets(model, cell.target_modules):
            base = model.get_submodule(name)
            weight = dense_weight(base)  # (out, in) for nn.Linear and Conv1D, 4-bit dequantized
            factors = initial_factors(cell.init, cell.rank, weight.detach(), scale, generator)
            if subtracts_from_base(cell.init):
                with torch.no_grad():
                    weight -= (scale * factors.b @ factors.a).to(weight.dtype)
            layer = self.layer_class(base, cell.rank, k, scale)
            layer.set_init(factors.a, factors.b)
            replace_module(model, name, layer)
            for i in range(k):
                per_trial[i] += layer.trial_params(name, i)
        return Attached(trial_params=per_trial, effective_scale=scale)


class LoRAPlus(LoRA):
    """LoRA+ : B (and every vector, as in PEFT's create_loraplus_optimizer) at ratio x the LR."""

    def param_groups(self, params: NamedParams, lr: float, cell: Cell,
                     weight_decay: float) -> list[dict]:
        assert cell.loraplus_ratio is not None
        fast = [(n, p) for n, p in params if n.endswith("lora_B") or p.ndim < 2]
        slow = [(n, p) for n, p in params if not (n.endswith("lora_B") or p.ndim < 2)]
        return (decay_groups(slow, lr, weight_decay)
                + decay_groups(fast, lr * cell.loraplus_ratio, weight_decay))


class DoRA(LoRA):
    """Weight-decomposed LoRA: a trainable magnitude per output row over the LoRA direction."""

    layer_class = StackedDoRALinear
