"""Full fine-tuning: every weight trains (every weight of the chosen parts of a vision-language
model, when the cell names parts). One trial per model copy, so it never fuses."""

from __future__ import annotations

import torch
from torch import nn

from lorasweep.config.search import is_parts
from lorasweep.methods.base import Attached, Batches, Method, stack_head
from lorasweep.methods.targets import in_parts
from lorasweep.space import Cell


class FullFineTuning(Method):
    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator,
               batches: Batches | None = None, lora_dropout: float = 0.0) -> Attached:
        """Every weight trains, so every weight is fp32 (master weights) whatever `model.dtype`
        the study stores its frozen base in."""
        if k != 1:
            raise ValueError("full fine-tuning trains one trial per model copy (k must be 1)")
        model.float()
        head = stack_head(model, 1, generator)[0]
        in_head = {id(p) for _, p in head}
        body = [(n, p) for n, p in model.named_parameters() if id(p) not in in_head
                and (not is_parts(cell.target_modules) or in_parts(n, cell.target_modules))]
        for _, param in body + head:
            param.requires_grad_(True)
        return Attached(trial_params=[body + head])
