"""The strategies that attach methods: a cell's method name resolves to its object here.

Which strategy a method uses, and everything else about it, is its entry in variants.VARIANTS.
"""

from __future__ import annotations

from lorasweep.methods.base import Attached, Method
from lorasweep.methods.full import FullFineTuning
from lorasweep.methods.lora import DoRA, LoRA, LoRAPlus
from lorasweep.methods.peft_passthrough import PeftPassThrough
from lorasweep.variants import variant

STRATEGIES: dict[str, type[Method]] = {
    "lora": LoRA,
    "loraplus": LoRAPlus,
    "dora": DoRA,
    "full": FullFineTuning,
    "peft": PeftPassThrough,
}


def get_method(name: str) -> Method:
    """The method of a registered name (a cell's `method`), built around its variant."""
    spec = variant(name)
    return STRATEGIES[spec.strategy](spec)


__all__ = ["STRATEGIES", "Attached", "Method", "get_method"]
