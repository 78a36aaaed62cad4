"""`peft`: any PEFT configuration, trained as PEFT builds it, for methods not native here.

The cell's rank, lora_alpha and target modules fill r, lora_alpha and target_modules unless the
study's arguments name them. PEFT replaces layers in the model in place, so the trainer drives
the model it already holds. One trial per model copy: these trials never fuse. Inits that need a
data pass before training (EVA, CorDA, LoRA-GA) are not run here: PEFT asks for them through its
own preprocessing calls, which this pass-through does not make.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import torch
from torch import nn

from lorasweep.methods.base import Attached, Method, init_head
from lorasweep.methods.targets import head_module_names, resolve_targets
from lorasweep.space import Cell


class PeftPassThrough(Method):
    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator) -> Attached:
        if k != 1:
            raise ValueError("peft pass-through trains one trial per model copy (k must be 1)")
        assert cell.peft is not None and cell.target_modules is not None
        spec = json.loads(cell.peft)
        config_class = getattr(peft, spec["config"])
        defaults = {"r": cell.rank, "lora_alpha": cell.alpha,
                    "target_modules": resolve_targets(model, cell.target_modules),
                    "modules_to_save": head_module_names(model) or None}
        accepted = {f.name for f in dataclasses.fields(config_class)}
        arguments = {name: value for name, value in defaults.items() if name in accepted}
        config = config_class(**{**arguments, **spec["arguments"]})
        init_head(model, generator)
        peft_model = peft.get_peft_model(model, config)
        params = [(name.removeprefix("base_model.model."), p)
                  for name, p in peft_model.named_parameters() if p.requires_grad]
        scales = [scale["default"] for module in model.modules()
                  if isinstance(scale := getattr(module, "scaling", None), dict) and scale]
        return Attached(trial_params=[params], effective_scale=scales[0] if scales else None)
