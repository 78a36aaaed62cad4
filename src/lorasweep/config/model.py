"""The study file's `model` section: where the base model comes from, and how it is stored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lorasweep.config.base import STRICT


class ModelSpec(BaseModel):
    """Where the base model comes from.

    `source` is a packaged name (`minilm`, `smollm2`, `digits-vit`), a local folder, a Hugging
    Face hub id, `tiny:bert` / `tiny:llama` (random weights from a small config, for tests), or
    `random:llama-1b` / `random:llama-8b` / `random:qwen2-0.5b` (a published architecture with
    random weights, for throughput and memory benchmarks at real size).

    `dtype` is how the frozen base weights are stored (adapters, DoRA magnitudes, the task head
    and the optimizer state stay fp32); None: bf16 when `train.precision` is bf16 on a GPU, else
    fp32 (see precision.py).
    """

    model_config = STRICT

    source: str = Field(min_length=1)
    revision: str | None = None
    trust_remote_code: bool = False
    # the frozen base's dtype (precision.py); None: bf16 with train.precision bf16 on a GPU
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    # nf4: the frozen base's block linear layers in 4-bit NormalFloat, as QLoRA (quantize.py)
    quantize: Literal["nf4"] | None = None
