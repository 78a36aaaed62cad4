"""Pretrain the image-generation demo's base pipeline "digits-diffusion" on the digits 0-4.

Why
---
A LoRA sweep on a diffusion model needs a pretrained denoiser whose function the tuning adapts;
no diffusion pipeline ships offline, so this script makes a tiny one in Stable Diffusion's
layout (unet, vae, text_encoder, tokenizer, scheduler): the 8x8 digits upscaled to 16x16, a VAE
that halves them to 4x8x8 latents, a one-layer text encoder over the words "0" ... "9" (the
caption is the digit), and a two-level UNet with cross-attention, trained from scratch on
``builtin:digits-0-4`` with the noise-prediction loss. The demo (``lorasweep run diffusion``)
then tunes its UNet on ``builtin:digits-5-9``: digits, and captions, it has never seen.

How
---
Images are read and resized as a study reads them (tasks/image_generation.square_pixels). With
one torch thread and a fixed seed, so that re-running gives the same weights: the VAE is trained
VAE_STEPS AdamW steps on reconstruction (and a small KL term), and its scaling factor set so the
training latents (posterior samples, as a study takes them) have unit standard deviation; the
text encoder keeps its random initialization (frozen, as a study keeps it: it only has to tell
the ten captions apart); the UNet is trained UNET_STEPS steps on fresh posterior samples, noise
and timesteps each step (DDPM's linear schedule, 1000 steps). It prints the denoising loss a
study measures before training, on the digits 0-4 (its own) and 5-9 (the demo's), and saves the
pipeline in ``src/lorasweep/data/digits_diffusion``.

Usage::

    python scripts/build_digits_diffusion.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from lorasweep.config import ModelSpec, SearchSpec, Study, TaskSpec, TrainSpec
from lorasweep.models import load_model, load_preprocessor
from lorasweep.packaged_models import DIGITS_DIFFUSION_DIR
from lorasweep.tasks import build_task
from lorasweep.tasks.data import load_splits
from lorasweep.tasks.image_classification import read_rgb
from lorasweep.tasks.image_generation import square_pixels

SEED = 0
SIZE = 16
BATCH = 32
VAE_STEPS = 300
VAE_LR = 2e-3
KL_WEIGHT = 1e-6
UNET_STEPS = 1000
UNET_LR = 2e-3
WARMUP = 100
WIDTH = 32  # the text encoder's width, the UNet's cross-attention width
TASKS = {digits: TaskSpec(kind="image_generation", dataset=f"builtin:digits-{digits}",
                          prompt_field="label", validation_size=90)
         for digits in ("0-4", "5-9")}


def tokenizer() -> PreTrainedTokenizerFast:
    """Whole words over the ten digits, padded to 4 tokens."""
    vocab = {"[PAD]": 0, "[UNK]": 1, **{str(d): d + 2 for d in range(10)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=4)


def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / WARMUP, 0.5 * (1 + math.cos(math.pi * step / steps))))


def train_vae(pixels: torch.Tensor, generator: torch.Generator) -> AutoencoderKL:
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(16, 32), norm_num_groups=8, sample_size=SIZE,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    lr = schedule(optimizer, VAE_STEPS)
    for step in range(VAE_STEPS):
        batch = pixels[torch.randint(len(pixels), (BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = (F.mse_loss(vae.decode(posterior.sample(generator)).sample, batch)
                + KL_WEIGHT * posterior.kl().mean())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lr.step()
        if (step + 1) % 100 == 0:
            print(f"vae step {step + 1}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        spread = vae.encode(pixels).latent_dist.sample(generator).std().item()
    vae.register_to_config(scaling_factor=1 / spread)
    return vae


def train_unet(posterior: DiagonalGaussianDistribution, scale: float, states: torch.Tensor,
               scheduler: DDPMScheduler, generator: torch.Generator) -> UNet2DConditionModel:
    """The UNet, on a fresh posterior sample, noise and timestep per image and step (a study
    samples the posterior too)."""
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.0)
    lr = schedule(optimizer, UNET_STEPS)
    for step in range(UNET_STEPS):
        index = torch.randint(len(states), (BATCH,), generator=generator)
        mean, std = posterior.mean[index], posterior.std[index]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,),
                                  generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=states[index]).sample,
                          noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lr.step()
        if (step + 1) % 250 == 0:
            print(f"unet step {step + 1}: loss {loss.item():.4f}")
    return unet.eval()


def build(out_dir: Path) -> None:
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    raw = load_splits(TASKS["0-4"], SEED)
    pixels = torch.stack([square_pixels(read_rgb(r["image"], str(i)), SIZE)
                          for i, r in enumerate(raw.train)])
    vae = train_vae(pixels, generator)
    words = tokenizer()
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(words), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=4, pad_token_id=0, bos_token_id=0,
        eos_token_id=0)).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        ids = words([str(r["label"]) for r in raw.train], padding="max_length",
                    return_tensors="pt")["input_ids"]
        states = encoder(ids)[0]
    unet = train_unet(posterior, vae.config.scaling_factor, states, scheduler, generator)
    parts = {"unet": unet, "vae": vae, "text_encoder": encoder, "tokenizer": words,
             "scheduler": scheduler}
    for name, part in parts.items():
        part.save_pretrained(str(out_dir / name))
    index = {name: ["transformers" if name in ("text_encoder", "tokenizer") else "diffusers",
                    type(part).__name__] for name, part in parts.items()}
    (out_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", **index}, indent=2) + "\n")
    report(out_dir)


def report(out_dir: Path) -> None:
    """The denoising loss a study measures before training, through lorasweep's own loading."""
    spec = ModelSpec(source=str(out_dir))
    parts = load_preprocessor(spec, "image_generation")
    unet = load_model(spec, "image_generation", None, parts)
    for digits, task_spec in TASKS.items():
        study = Study(name=f"digits-{digits}", seed=SEED, model=spec, task=task_spec,
                      train=TrainSpec(steps=1), search=SearchSpec(methods=["lora"], lr=[1e-3]))
        task = build_task(study, parts)
        loss = task.evaluate(unet, task.validation, 1, 256, torch.device("cpu"))[0]
        print(f"digits {digits}: validation eval_loss {loss['eval_loss']:.4f} "
              f"({len(task.validation)} images)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DIGITS_DIFFUSION_DIR,
                        help=f"where the pipeline goes (default {DIGITS_DIFFUSION_DIR})")
    build(parser.parse_args().out)
