"""LoRA and the variants that differ only in scale (rsLoRA), init (gaussian, muA) or LR (LoRA+).

y = W x + s * B A x, with s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). The inits follow
Hugging Face PEFT (kaiming-uniform A with a = sqrt(5); gaussian A ~ N(0, 1/r^2)) and the muA paper
(Init[A]: A ~ N(0, 1/n), B = 0; Init[B]: A = 0, B ~ N(0, 1/r)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorasweep.methods.base import Attached, Method, NamedParams, decay_groups, stack_head
from lorasweep.methods.stacked import StackedLoRALinear
from lorasweep.methods.targets import replace_module, resolve_targets
from lorasweep.space import Cell


def initial_factors(init: str, rank: int, n_in: int, n_out: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting (A, B) for one layer: A is (r, n_in), B is (n_out, r)."""
    a = torch.zeros(rank, n_in)
    b = torch.zeros(n_out, rank)
    if init == "kaiming":
        # PEFT's default: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(n_in)).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    elif init == "gaussian":
        a.normal_(0.0, 1.0 / rank, generator=generator)
    elif init == "mua_a":
        a.normal_(0.0, 1.0 / math.sqrt(n_in), generator=generator)
    elif init == "mua_b":
        b.normal_(0.0, 1.0 / math.sqrt(rank), generator=generator)
    else:
        raise ValueError(f"unknown init '{init}'")
    return a, b


class LoRA(Method):
    """Plain LoRA; `rank_scaling="sqrt"` makes it rsLoRA."""

    def __init__(self, rank_scaling: str = "linear") -> None:
        self.rank_scaling = rank_scaling

    def scale(self, cell: Cell) -> float:
        assert cell.rank is not None and cell.alpha is not None
        divisor = math.sqrt(cell.rank) if self.rank_scaling == "sqrt" else cell.rank
        return cell.alpha / divisor

    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator) -> Attached:
        assert cell.rank is not None and cell.init is not None and cell.target_modules
        for param in model.parameters():
            param.requires_grad_(False)
        per_trial = stack_head(model, k, generator)
        scale = self.scale(cell)
        for name in resolve_targets(model, cell.target_modules):
            base = model.get_submodule(name)
            layer = StackedLoRALinear(base, cell.rank, k, scale)
            layer.set_init(*initial_factors(cell.init, cell.rank, base.in_features,
                                            base.out_features, generator))
            replace_module(model, name, layer)
            for i in range(k):
                per_trial[i] += [(f"{name}.lora_A", layer.lora_A[i]),
                                 (f"{name}.lora_B", layer.lora_B[i])]
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
