"""`peft`: any PEFT configuration, trained as PEFT builds it, for methods not native here.

The cell's rank, lora_alpha and target modules fill r, lora_alpha and target_modules unless the
study's arguments name them; arguments that name their own target_modules reach PEFT untouched
(lorasweep's presets are not resolved for them). Targets lorasweep resolves that include a Conv1D
(GPT-2) come with fan_in_fan_out=True, as PEFT wants for them. PEFT replaces layers in the model
in place, so the trainer drives the model it already holds. One trial per model copy: these
trials never fuse. Inits that look at data first get a few training batches through PEFT's own
calls: `preprocess_corda` (CorDA) and `preprocess_loraga` (LoRA-GA) before the adapters are
built, `initialize_lora_eva_weights` (EVA) after. Nested PEFT configs (eva_config, corda_config,
lora_ga_config, loftq_config) may be given as mappings in the study file.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import torch
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from torch import nn

from lorasweep.methods.base import Attached, Batches, Method, init_head
from lorasweep.methods.targets import head_save_names, resolve_targets, uses_conv1d
from lorasweep.peft_config import build_peft_config
from lorasweep.space import Cell

DATA_INITS = ("eva", "corda", "lora_ga")  # PEFT inits that look at training batches first


class PeftPassThrough(Method):
    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator,
               batches: Batches | None = None, lora_dropout: float = 0.0) -> Attached:
        if k != 1:
            raise ValueError("peft pass-through trains one trial per model copy (k must be 1)")
        assert cell.peft is not None and cell.target_modules is not None
        spec = json.loads(cell.peft)
        config_class = getattr(peft, spec["config"])
        defaults = {"r": cell.rank, "lora_alpha": cell.alpha, "lora_dropout": lora_dropout,
                    "modules_to_save": head_save_names(model) or None}
        if not names_own_targets(cell):
            targets = resolve_targets(model, cell.target_modules)
            defaults |= {"target_modules": targets, "fan_in_fan_out": uses_conv1d(model, targets)}
        accepted = {f.name for f in dataclasses.fields(config_class)}
        arguments = {name: value for name, value in defaults.items() if name in accepted}
        config = build_peft_config(spec["config"], {**arguments, **spec["arguments"]})
        init_head(model, generator)
        init = getattr(config, "init_lora_weights", None)
        if init in DATA_INITS and batches is None:
            raise ValueError(f"init_lora_weights '{init}' needs training batches")
        if init == "corda":
            # CorDA's covariance hook takes one sequence at a time (it squeezes a batch of one)
            preprocess_corda(model, config, run_model=lambda: _run(
                model, [row for b in batches() for row in _single_rows(b)], backward=False))
        elif init == "lora_ga":
            preprocess_loraga(
                model, config, train_step=lambda: _run(model, batches(), backward=True))
        peft_model = peft.get_peft_model(model, config)
        if init == "eva":
            inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches()]
            # PEFT's defaults pick token positions by the attention mask; inputs without token
            # ids (pixel values) take every position, through PEFT's own default hook
            positions = ({} if "input_ids" in inputs[0] else
                         {"prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None})
            peft.initialize_lora_eva_weights(peft_model, dataloader=inputs,
                                             show_progress_bar=False, **positions)
        params = [(name.removeprefix("base_model.model."), p)
                  for name, p in peft_model.named_parameters() if p.requires_grad]
        scales = [scale["default"] for module in model.modules()
                  if isinstance(scale := getattr(module, "scaling", None), dict) and scale]
        return Attached(trial_params=[params], effective_scale=scales[0] if scales else None,
                        peft_model=peft_model)


def needs_data(cell: Cell) -> bool:
    """Whether this peft cell's init looks at training batches before training."""
    return json.loads(cell.peft or "{}").get("arguments", {}).get("init_lora_weights") in DATA_INITS


def names_own_targets(cell: Cell) -> bool:
    """Whether this is a peft cell whose arguments name target_modules (PEFT resolves them)."""
    return "target_modules" in json.loads(cell.peft or "{}").get("arguments", {})


def _single_rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A batch as batches of one example each, token rows without their padding."""
    rows = []
    for i in range(batch["labels"].shape[0]):
        row = {name: t[i:i + 1] for name, t in batch.items()}
        if "attention_mask" in row:
            length = int(row["attention_mask"].sum())
            row = {name: t[:, :length] if t.ndim == 2 else t for name, t in row.items()}
        rows.append(row)
    return rows


def _run(model: nn.Module, batches: list[dict[str, torch.Tensor]], backward: bool) -> None:
    """Forward (and backward, for gradient-based inits) over calibration batches, with the
    model's own loss (transformers computes it from `labels`)."""
    with torch.set_grad_enabled(backward):
        for batch in batches:
            loss = model(**batch).loss
            if backward:
                loss.backward()
