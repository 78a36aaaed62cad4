"""Which dtypes a study computes in on a device, checked before any model is loaded.

The frozen base may be stored in bf16 or fp16 to halve its memory; what trains (adapters, DoRA
magnitudes, the task head, full fine-tuning's weights) and the optimizer state stay fp32, as PEFT
users do with `torch_dtype=bfloat16`: an adapter's small updates would vanish in bf16 rounding.
"""

from __future__ import annotations

import torch

from lorasweep.config import ModelSpec, Study, TrainSpec
from lorasweep.errors import StudyError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def base_dtype(model: ModelSpec, train: TrainSpec, device: str) -> torch.dtype:
    """The dtype of the frozen base: `model.dtype`, else bf16 for bf16 training on a GPU."""
    if model.dtype is not None:
        return DTYPES[model.dtype]
    on_gpu = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_gpu and train.precision == "bf16" else torch.float32


def check_device_support(study: Study, device: str) -> None:
    """Refuse, in one line, a dtype the device cannot compute in."""
    kind = torch.device(device).type
    if study.model.dtype == "fp16" and kind != "cuda":
        raise StudyError(f"model.dtype: fp16 needs a CUDA GPU (--device {device}); allowed "
                         "here: bf16, fp32")
    wants_bf16 = study.model.dtype == "bf16" or study.train.precision == "bf16"
    if wants_bf16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        field = "model.dtype" if study.model.dtype == "bf16" else "train.precision"
        raise StudyError(f"{field}: bf16: this GPU ({torch.cuda.get_device_name(device)}) does "
                         "not compute in bf16; allowed here: fp32 (model.dtype also fp16)")


def autocast(train: TrainSpec, device: torch.device) -> torch.autocast:
    """bf16 autocast for `precision: bf16` (parameters stay fp32: the adapters' small updates
    would vanish in bf16 rounding); a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")
