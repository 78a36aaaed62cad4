"""A tiny Stable Diffusion pipeline with random weights, saved as a pipeline folder (unet, vae,
text_encoder, tokenizer, scheduler, model_index.json) as a hub repository lays one out: the
image_generation tests load it through the same path as a real one. Its tokenizer is MiniLM's,
which ships offline (a CLIP tokenizer would need the hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from lorasweep.packaged_models import packaged_model_path

# 8x8 latents of 16x16 images (the VAE halves once); the text encoder's width is the UNet's
# cross-attention width
WIDTH = 16


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention at both: convolutions, attention, feed-forward and
    time-embedding linears, as Stable Diffusion's, at a few thousand weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=WIDTH).eval()


def tiny_pipeline(folder: Path) -> Path:
    """The pipeline folder, its weights drawn from seed 0."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path("minilm"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            block_out_channels=(8, 16), norm_num_groups=4, sample_size=16,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2)
        encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id))
    parts = {"unet": tiny_unet(), "vae": vae, "text_encoder": encoder, "tokenizer": tokenizer,
             "scheduler": DDPMScheduler(num_train_timesteps=100)}
    for name, part in parts.items():
        part.save_pretrained(str(folder / name))
    index = {name: ["transformers" if name in ("text_encoder", "tokenizer") else "diffusers",
                    type(part).__name__] for name, part in parts.items()}
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", **index}))
    return folder
