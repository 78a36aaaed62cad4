"""Captions to a denoiser's text conditioning, as each family's diffusers pipeline and
training script make it, once per dataset (tasks/image_generation.py).

- Stable Diffusion 1.x/2.x: the text encoder's last hidden states.
- SDXL: both CLIP encoders' penultimate hidden states side by side (the UNet's
  encoder_hidden_states) and the second encoder's projected pooled output (`text_embeds`).
- SD3: both CLIP encoders' penultimate states side by side, zero-padded to the joint width and
  followed on the sequence by T5's last hidden states (zeros where the pipeline leaves T5 out,
  as diffusers' pipeline does); both CLIPs' pooled outputs side by side (`pooled_projections`).

CLIP prompts are padded to the tokenizer's full length (at most the encoder's positions), T5's
to T5_LENGTH, the SD3 LoRA script's default max_sequence_length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lorasweep.models import DiffusionParts

# Captions through a text encoder at a time.
ENCODE_BATCH = 16
# SD3's T5 sequence length (train_dreambooth_lora_sd3.py's --max_sequence_length default).
T5_LENGTH = 77

Conditioning = dict[str, torch.Tensor]


@torch.no_grad()
def conditioning(parts: DiffusionParts, captions: list[str]) -> Conditioning:
    """Each caption's `states` (and `pooled`, for SDXL and SD3), one row per caption; each
    distinct caption is encoded once."""
    distinct = sorted(set(captions))
    encode = FAMILY_TEXT[parts.family.name]
    chunks = [encode(parts, distinct[start:start + ENCODE_BATCH])
              for start in range(0, len(distinct), ENCODE_BATCH)]
    joined = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
    position = {caption: i for i, caption in enumerate(distinct)}
    rows = torch.tensor([position[caption] for caption in captions], dtype=torch.long)
    return {name: values[rows] for name, values in joined.items()}


def _ids(tokenizer, encoder: torch.nn.Module, texts: list[str], length: int | None = None
         ) -> torch.Tensor:
    """Token ids padded to `length` (CLIP: the tokenizer's length, at most the encoder's
    positions)."""
    if length is None:
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt")["input_ids"]


def _clip(parts: DiffusionParts, texts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Both CLIP encoders' penultimate hidden states side by side, and their pooled outputs."""
    states, pooled = [], []
    for encoder, tokenizer in parts.encoders[:2]:
        output = encoder(_ids(tokenizer, encoder, texts), output_hidden_states=True)
        states.append(output.hidden_states[-2].float())
        pooled.append(output[0].float())
    return torch.cat(states, dim=-1), pooled


def _sd_text(parts: DiffusionParts, texts: list[str]) -> Conditioning:
    encoder, tokenizer = parts.encoders[0]
    return {"states": encoder(_ids(tokenizer, encoder, texts))[0].float()}


def _sdxl_text(parts: DiffusionParts, texts: list[str]) -> Conditioning:
    states, pooled = _clip(parts, texts)
    return {"states": states, "pooled": pooled[-1]}


def _sd3_text(parts: DiffusionParts, texts: list[str]) -> Conditioning:
    clip, pooled = _clip(parts, texts)
    if parts.encoders[2] is None:
        t5 = torch.zeros(len(texts), T5_LENGTH, parts.denoiser_config["joint_attention_dim"])
    else:
        encoder, tokenizer = parts.encoders[2]
        t5 = encoder(_ids(tokenizer, encoder, texts, T5_LENGTH))[0].float()
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"states": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}


# Each denoiser family's conditioning (denoisers.FAMILIES), by its name.
FAMILY_TEXT: dict[str, Callable[[DiffusionParts, list[str]], Conditioning]] = {
    "sd": _sd_text, "sdxl": _sdxl_text, "sd3": _sd3_text}
