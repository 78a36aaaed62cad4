"""The registry of methods: a cell's method name resolves to its strategy object here."""

from __future__ import annotations

from lorasweep.methods.base import Attached, Method
from lorasweep.methods.full import FullFineTuning
from lorasweep.methods.lora import DoRA, LoRA, LoRAPlus
from lorasweep.methods.peft_passthrough import PeftPassThrough

METHODS: dict[str, Method] = {
    "lora": LoRA(),
    "rslora": LoRA(rank_scaling="sqrt"),
    "loraplus": LoRAPlus(),
    "dora": DoRA(),
    # LoRA with an init of its own (config.METHOD_INITS gives it to their cells)
    "pissa": LoRA(),
    "milora": LoRA(),
    "olora": LoRA(),
    "init_ab": LoRA(),
    "random_ab": LoRA(),
    "full": FullFineTuning(),
    "peft": PeftPassThrough(),
}


def get_method(name: str) -> Method:
    return METHODS[name]


__all__ = ["METHODS", "Attached", "Method", "get_method"]
