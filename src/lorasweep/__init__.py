"""lorasweep: tune the learning rate before you judge the LoRA variant."""

__version__ = "0.1.0"
