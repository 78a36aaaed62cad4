"""What every method does: put trainable weights for K trials on a model, and group them for AdamW.

A method is a strategy object (its class: how it attaches) built around its `variants.Variant`
(its facts: init, scale, fusable, PEFT arguments, muA family), which every other module asks
instead of comparing names. A variant that attaches as an existing strategy does (a new init
or scale) is one `Variant(...)` line in variants.VARIANTS, plus its init's function in
methods/inits.FACTORS if the init is new; one that attaches differently is one strategy class
here and one line in methods/__init__.STRATEGIES besides. See ARCHITECTURE.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorasweep.errors import StudyError
from lorasweep.methods.stacked import StackedCopies, StackedLinear
from lorasweep.methods.targets import head_module_names, replace_module
from lorasweep.space import Cell
from lorasweep.variants import Variant

NamedParams = list[tuple[str, nn.Parameter]]
Batches = Callable[[], list[dict[str, torch.Tensor]]]


@dataclass
class Attached:
    """The trainable weights of each of the K trials, and the scale s that multiplies BA."""

    trial_params: list[NamedParams]
    effective_scale: float | None = None
    peft_model: nn.Module | None = None  # the PeftModel of a method PEFT builds (export saves it)

    @property
    def trainable_count(self) -> int:
        """Trainable parameters of one trial."""
        return sum(p.numel() for _, p in self.trial_params[0])


class Method(ABC):
    """A parametrization family: how it adapts a model and how its parameters meet the optimizer."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant

    @property
    def fusable(self) -> bool:
        """Whether K trials of it train side by side over one base copy."""
        return self.variant.fusable

    def scale(self, cell: Cell) -> float:
        """The scale s that multiplies B A at this cell's rank and lora_alpha."""
        assert cell.rank is not None and cell.alpha is not None
        return self.variant.scale(cell.alpha, cell.rank)

    def peft_arguments(self, cell: Cell) -> dict | None:
        """PEFT LoraConfig arguments beyond r, lora_alpha and targets for this cell; None
        where PEFT has no form of it."""
        return self.variant.peft_arguments(cell.init)

    @abstractmethod
    def attach(self, model: nn.Module, cell: Cell, k: int, generator: torch.Generator,
               batches: Batches | None = None, lora_dropout: float = 0.0) -> Attached:
        """Modify `model` in place for K trials; everything not returned stays frozen.

        `batches` gives a few training batches, for inits that look at data before training
        (EVA, CorDA, LoRA-GA through PEFT); the other methods ignore it. `lora_dropout`: the
        dropout on the adapter's input while training (config refuses it for full fine-tuning).
        """

    def param_groups(self, params: NamedParams, lr: float, cell: Cell,
                     weight_decay: float) -> list[dict]:
        """AdamW groups for one trial: weight decay on matrices only, as the HF Trainer does."""
        return decay_groups(params, lr, weight_decay)


def decay_groups(params: NamedParams, lr: float, weight_decay: float) -> list[dict]:
    matrices = [p for _, p in params if p.ndim >= 2]
    vectors = [p for _, p in params if p.ndim < 2]
    return [group for group in (
        {"params": matrices, "lr": lr, "weight_decay": weight_decay},
        {"params": vectors, "lr": lr, "weight_decay": 0.0},
    ) if group["params"]]


def init_head(model: nn.Module, generator: torch.Generator) -> list[tuple[str, nn.Module]]:
    """The task head's layers that hold weights, with its linear layers drawn from the trial
    seed (N(0, initializer_range), zero bias, as transformers does) rather than kept as the
    model loader left them; its other layers (norms) keep their loaded weights.

    The head trains, so its linear layers are made fp32 over a half-precision base, and cast
    their input to fp32. A head layer that holds weights of its own beside layers that hold
    more cannot be copied per trial layer by layer, and is refused.
    """
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    layers: list[tuple[str, nn.Module]] = []
    for head_name in head_module_names(model):
        for name, module in model.get_submodule(head_name).named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            full_name = f"{head_name}.{name}" if name else head_name
            if any(True for child in module.children() for _ in child.parameters()):
                raise StudyError(f"model.source: the task head's layer {full_name} "
                                 f"({type(module).__name__}) holds weights beside layers "
                                 "that hold more; lorasweep trains a head layer by layer")
            if isinstance(module, nn.Linear):
                module.float().register_forward_pre_hook(_inputs_to_fp32)
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
            layers.append((full_name, module))
    return layers


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def stack_head(model: nn.Module, k: int, generator: torch.Generator) -> list[NamedParams]:
    """Give each trial its own trainable task head, freshly initialized from the trial seed.

    The head is trained under every method (LoRA and full fine-tuning alike), all its weights
    as PEFT's modules_to_save trains them (norms too), and its linear layers are drawn from the
    seed rather than from whatever the model loader left there, so runs are reproducible.
    """
    per_trial: list[NamedParams] = [[] for _ in range(k)]
    for full_name, layer in init_head(model, generator):
        if isinstance(layer, nn.Linear):
            stacked: nn.Module = StackedLinear(layer, k)
            trials = [[("weight", stacked.weight[i])] + (
                [] if stacked.bias is None else [("bias", stacked.bias[i])]) for i in range(k)]
        else:
            stacked = StackedCopies(layer, k)
            trials = [list(one.named_parameters()) for one in stacked.copies]
        replace_module(model, full_name, stacked)
        for i, params in enumerate(trials):
            per_trial[i].extend((f"{full_name}.{name}", param) for name, param in params)
    return per_trial
