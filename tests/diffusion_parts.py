"""Tiny Stable Diffusion, SDXL and SD3 pipelines with random weights, saved as pipeline folders
(unet or transformer, vae, text encoders, tokenizers, scheduler, model_index.json) as a hub
repository lays one out: the image_generation tests load them through the same path as a real
one. Their tokenizers are MiniLM's, which ships offline (a CLIP tokenizer would need the hub);
the SD3 pipeline leaves T5 out (text_encoder_3 null), as diffusers' pipeline allows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from lorasweep.packaged_models import packaged_model_path

# 8x8 latents of 16x16 images (the VAE halves once); the text encoder's width is the UNet's
# cross-attention width
WIDTH = 16
# SDXL's second encoder's pooled width and its time-id embedding width (six ids each)
POOLED, TIME_WIDTH = 16, 4


def tiny_unet(seed: int = 0, **conditioning) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention at both: convolutions, attention, feed-forward and
    time-embedding linears, as Stable Diffusion's, at a few thousand weights (`conditioning`:
    the config fields of another family's, as tiny_sdxl_unet's)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **{"cross_attention_dim": WIDTH, **conditioning}).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """tiny_unet with SDXL's added conditioning: cross-attention over both encoders' states
    side by side, the pooled text and six time ids embedded into the time embedding."""
    return tiny_unet(seed, cross_attention_dim=2 * WIDTH, addition_embed_type="text_time",
                     addition_time_embed_dim=TIME_WIDTH,
                     projection_class_embeddings_input_dim=POOLED + 6 * TIME_WIDTH)


def tiny_sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """A two-block MMDiT over 2x2 patches of 8x8 latents: joint attention of the image and text
    streams, AdaLN from the timestep and pooled text, as SD3's."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=4, num_attention_heads=2, caption_projection_dim=8,
            joint_attention_dim=2 * WIDTH, pooled_projection_dim=2 * WIDTH,
            pos_embed_max_size=8).eval()


def _clip(tokenizer, projection: bool):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
        projection_dim=POOLED, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _save(folder: Path, pipeline: str, parts: dict, **extra) -> Path:
    for name, part in parts.items():
        part.save_pretrained(str(folder / name))
    index = {name: ["transformers" if name.startswith(("text_encoder", "tokenizer"))
                    else "diffusers", type(part).__name__] for name, part in parts.items()}
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": pipeline, **index, **extra}))
    return folder


def _vae(**extra) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(8, 16), norm_num_groups=4, sample_size=16,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, **extra)


def tiny_sdxl_pipeline(folder: Path) -> Path:
    """An SDXL pipeline folder (two CLIP encoders, the second with a projection), seed 0."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path("minilm"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae, first, second = _vae(), _clip(tokenizer, False), _clip(tokenizer, True)
    return _save(folder, "StableDiffusionXLPipeline", {
        "unet": tiny_sdxl_unet(), "vae": vae, "text_encoder": first, "tokenizer": tokenizer,
        "text_encoder_2": second, "tokenizer_2": tokenizer,
        "scheduler": DDPMScheduler(num_train_timesteps=100)})


def tiny_sd3_pipeline(folder: Path, t5: bool = False) -> Path:
    """An SD3 pipeline folder, seed 0, without T5 (text_encoder_3 and tokenizer_3 null) or with
    a tiny T5 encoder of the joint width (over MiniLM's tokenizer: T5's own needs the hub); its
    VAE shifts and scales latents as SD3's does."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path("minilm"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = _vae(shift_factor=0.0609, scaling_factor=1.5035)
        first, second = _clip(tokenizer, True), _clip(tokenizer, True)
        encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=2 * WIDTH, d_kv=8, d_ff=32, num_layers=1,
            num_heads=2, pad_token_id=tokenizer.pad_token_id)) if t5 else None
    third = ({"text_encoder_3": encoder, "tokenizer_3": tokenizer} if t5
             else {})
    missing = {} if t5 else {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    return _save(folder, "StableDiffusion3Pipeline", {
        "transformer": tiny_sd3_transformer(), "vae": vae, "text_encoder": first,
        "tokenizer": tokenizer, "text_encoder_2": second, "tokenizer_2": tokenizer, **third,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}, **missing)


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
