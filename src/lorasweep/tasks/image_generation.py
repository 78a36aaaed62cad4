"""Image generation: LoRA (or full fine-tuning) on a diffusion pipeline's denoiser, trained with
the standard noise-prediction loss on images with captions (or without: the empty prompt).

The base model is the denoiser alone (models.load_denoiser, a UNet2DConditionModel); the VAE,
the text encoder and the noise schedule are frozen and run once per dataset, here, never on a
training step: each image is decoded, resized to the pipeline's resolution (shorter side, then
a centre crop, as diffusers' own training scripts do), scaled to [-1, 1] and encoded to
latents; each caption is embedded. Each example then gets its noise and timestep, and a split's
inputs are what the denoiser takes (`sample`: the noised latents, `timestep`,
`encoder_hidden_states`), its labels what it must predict (the noise, or v, or the latents, by
the schedule's prediction_type). So training, evaluation, curvature, the memory probes and
fused groups need nothing diffusion-specific: a fused group repeats each example's noised
latents K times, and a trial computes the same alone or fused.

Noise and timesteps are fixed per example, drawn once from a seed per split (not the study
seed): a trial's numbers then do not depend on its group, its micro-batches or an
out-of-memory split, every trial of every seed (and every study on the same data) is scored
on the same validation triples, and the training data is the same set of noised examples for
every trial, as its images are. The price: an example keeps its noise across epochs, where
diffusers' scripts draw fresh noise per step; sweeps are short (often under an epoch), and
more images give more draws.

The metric is eval_loss, the mean squared error of the prediction on the validation triples
(lower is better).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lorasweep.config import Study
from lorasweep.errors import StudyError, first_line
from lorasweep.models import DiffusionParts
from lorasweep.tasks.base import Split, Task, logits_of, per_trial
from lorasweep.tasks.data import RawSplits, Records, require_field
from lorasweep.tasks.image_classification import image_place, read_rgb

# Images (or captions) through the VAE (or the text encoder) at a time, while encoding a split.
ENCODE_BATCH = 16
# The seed of each split's VAE samples, noise and timesteps (see the module docstring).
SPLIT_SEEDS = {"training": 0, "validation": 1, "test": 2}


class ImageGenerationTask(Task):
    """Reports eval_loss: the denoising loss on fixed (latent, noise, timestep) triples."""

    def trial_losses(self, logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        return per_trial(self._squared_errors(logits, labels, k), k, "mean")

    def loss_count(self, labels: torch.Tensor) -> int:
        return labels.shape[0]

    def eval_terms(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, int, torch.Tensor]:
        per_example = self._squared_errors(logits, labels, k).flatten(1).mean(1)
        return per_trial(per_example, k), labels.shape[0], torch.zeros(k)

    def summarize(self, loss_sum: torch.Tensor, count: int, correct: torch.Tensor) -> list[dict]:
        return [{"eval_loss": float(loss) / count} for loss in loss_sum]

    @staticmethod
    def _squared_errors(prediction: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        """Element-wise squared error of K trials' predictions against the target, in fp32."""
        repeated = target.repeat(k, *(1,) * (target.ndim - 1))
        return F.mse_loss(prediction.float(), repeated.float(), reduction="none")

    @torch.no_grad()
    def check_model(self, model: nn.Module) -> None:
        """One forward pass on one validation example: a denoiser that does not take its own
        pipeline's latents or text embeddings fails here, before any trial is claimed."""
        try:
            logits_of(model, self.validation.batch(torch.arange(1), 1))
        except (ValueError, RuntimeError) as exc:
            raise StudyError("model.source: the denoiser cannot take the latents and text "
                             f"embeddings of its own pipeline's VAE and text encoder "
                             f"({first_line(exc)})") from None


def build_image_generation(study: Study, raw: RawSplits, parts: DiffusionParts,
                           seq_len: int) -> ImageGenerationTask:
    """Noised latents, timesteps, caption embeddings and targets of each split (`seq_len` does
    not apply: captions take the text encoder's own length)."""
    spec = study.task
    require_field(raw, spec.image_field, "task.image_field")
    if spec.prompt_field is not None:
        require_field(raw, spec.prompt_field, "task.prompt_field")
    prediction = parts.scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise StudyError(f"model.source: its scheduler predicts '{prediction}'; image_generation "
                         "trains epsilon, v_prediction or sample denoisers")

    def encode(records: Records, split: str) -> Split:
        place = partial(image_place, raw, spec.image_field, records, split)
        pixels = torch.stack([square_pixels(read_rgb(record[spec.image_field], place(i)),
                                      parts.resolution)
                              for i, record in enumerate(records)])
        captions = ["" if spec.prompt_field is None else str(record[spec.prompt_field])
                    for record in records]
        generator = torch.Generator().manual_seed(SPLIT_SEEDS[split])
        latents = _latents(parts, pixels, generator)
        noise = torch.randn(latents.shape, generator=generator)
        schedule = parts.scheduler
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(records),),
                                  generator=generator)
        target = {"epsilon": noise, "sample": latents}.get(prediction)
        if target is None:
            target = schedule.get_velocity(latents, noise, timesteps)
        return Split({"sample": schedule.add_noise(latents, noise, timesteps),
                      "timestep": timesteps,
                      "encoder_hidden_states": _embeddings(parts, captions)}, target)

    test = None if raw.test is None else encode(raw.test, "test")
    return ImageGenerationTask(encode(raw.train, "training"),
                               encode(raw.validation, "validation"), test)


def square_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as the VAE takes it: shorter side resized to `size`, centre-cropped to a
    square, values in [-1, 1], shape (3, size, size)."""
    scale = size / min(image.size)
    width, height = (max(size, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return values.reshape(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def _latents(parts: DiffusionParts, pixels: torch.Tensor, generator: torch.Generator
             ) -> torch.Tensor:
    """The VAE's latents of the images (a seeded sample of its posterior, as diffusers' training
    scripts take), shifted and scaled as the pipeline's denoiser expects them."""
    vae = parts.vae
    samples = torch.cat([vae.encode(chunk.to(vae.dtype)).latent_dist.sample(generator).float()
                         for chunk in pixels.split(ENCODE_BATCH)])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (samples - shift) * vae.config.scaling_factor


@torch.no_grad()
def _embeddings(parts: DiffusionParts, captions: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states of each caption, padded to its full length as
    Stable Diffusion's pipelines pad prompts; each distinct caption is encoded once."""
    distinct = sorted(set(captions))
    encoder, tokenizer = parts.text_encoder, parts.tokenizer
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    states = []
    for start in range(0, len(distinct), ENCODE_BATCH):
        ids = tokenizer(distinct[start:start + ENCODE_BATCH], padding="max_length",
                        max_length=length, truncation=True, return_tensors="pt")["input_ids"]
        states.append(encoder(ids)[0].float())
    by_caption = dict(zip(distinct, torch.cat(states), strict=True))
    return torch.stack([by_caption[caption] for caption in captions])
