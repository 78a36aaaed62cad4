"""LoRA and the variants that differ in scale (rsLoRA), init (methods/inits.py) or LR (LoRA+).

y = W_res x + s * B A x, with s = lora_alpha / r^p as the variant says (rsLoRA: p = 1/2). A
residual init (variants.INITS) sets W_res = W - s B A so the model is unchanged at step 0;
`random_ab` skips that subtraction, the control showing that random A and B alone destroy the
pretrained function.

Trials of a group share their seed, hence their init, hence W_res: the group's copy of the base
carries it, and no per-trial correction is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from lorasweep.methods.base import (
    Attached,
    Batches,
    Method,
    NamedParams,
    decay_groups,
    stack_head,
)
from lorasweep.methods.inits import initial_factors
from lorasweep.methods.stacked import StackedDoRALinear, StackedLoRALinear, dense_weight
from lorasweep.methods.targets import replace_module, resolve_targets
from lorasweep.space import Cell
from lorasweep.variants import get_init


class LoRA(Method):
    """Plain LoRA, and every variant that differs from it only in its Variant entry."""

    layer_class: type[StackedLoRALinear] = StackedLoRALinear

    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator,
               batches: Batches | None = None, lora_dropout: float = 0.0) -> Attached:
        assert cell.rank is not None and cell.init is not None and cell.target_modules
        for param in model.parameters():
            param.requires_grad_(False)
        per_trial = stack_head(model, k, generator)
        scale = self.scale(cell)
        for name in resolve_targets(model, cell.target_modules):
            base = model.get_submodule(name)
            weight = dense_weight(base)  # (out, in) for nn.Linear and Conv1D, 4-bit dequantized
            factors = initial_factors(cell.init, cell.rank, weight.detach(), scale, generator)
            if get_init(cell.init).residual:
                if getattr(base.weight, "quant_state", None) is not None:  # config refuses it too
                    raise ValueError(f"init '{cell.init}' subtracts from the base weight, which a "
                                     f"4-bit layer ({name}) cannot hold")
                with torch.no_grad():
                    weight -= (scale * factors.b @ factors.a).to(weight.dtype)
            layer = self.layer_class(base, cell.rank, k, scale, lora_dropout)
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
