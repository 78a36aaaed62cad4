"""Image generation: LoRA (or full fine-tuning) on a diffusion pipeline's denoiser, trained with
the loss diffusers' training scripts take for its family (denoisers.FAMILIES), on images with
captions (or without: the empty prompt).

The base model is the denoiser alone (models.load_denoiser: a UNet2DConditionModel for Stable
Diffusion 1.x/2.x and SDXL, an SD3Transformer2DModel for SD3); the VAE, the text encoders and
the noise schedule are frozen and run once per dataset, here, never on a training step: each
image is decoded, resized to the pipeline's resolution (shorter side, then a centre crop, as
diffusers' own training scripts do), scaled to [-1, 1] and encoded to latents; each caption is
embedded (tasks/diffusion_text.py). Each example then gets its noise and timestep, and a
split's inputs are what the denoiser takes, its labels what it must match:

- noise families (SD, SDXL): `sample` (the latents noised on the DDPM schedule), `timestep`,
  `encoder_hidden_states` (SDXL also `text_embeds` and `time_ids`); the labels are the noise,
  or v, or the latents, by the schedule's prediction_type; the loss their mean squared error.
- flow (SD3): `hidden_states` (the latents noised on the straight line to the noise at a
  sigma of the FlowMatchEulerDiscreteScheduler, drawn from the logit-normal density),
  `timestep`, `encoder_hidden_states`, `pooled_projections`; the labels pack the target, the
  factor on the prediction and the weight (flow_labels), so the loss is the SD3 LoRA script's
  with its defaults (FlowMatchingTask).

So training, evaluation, curvature, the memory probes and fused groups need nothing
diffusion-specific: a fused group repeats each example's inputs K times, and a trial computes
the same alone or fused.

Noise and timesteps are fixed per example, drawn once from a seed per split (not the study
seed): a trial's numbers then do not depend on its group, its micro-batches or an
out-of-memory split, every trial of every seed (and every study on the same data) is scored
on the same validation triples, and the training data is the same set of noised examples for
every trial, as its images are. The price: an example keeps its noise across epochs, where
diffusers' scripts draw fresh noise per step; sweeps are short (often under an epoch), and
more images give more draws.

The metric is eval_loss, the loss of the prediction on the validation triples (lower is
better).
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
from lorasweep.tasks.diffusion_text import conditioning
from lorasweep.tasks.image_classification import image_place, read_rgb

# Images through the VAE at a time, while encoding a split.
ENCODE_BATCH = 16
# The seed of each split's VAE samples, noise and timesteps (see the module docstring).
SPLIT_SEEDS = {"training": 0, "validation": 1, "test": 2}
# A flow family's timestep density and loss weighting (diffusers' weighting_scheme), its
# parameters, and whether outputs are preconditioned: train_dreambooth_lora_sd3.py's defaults.
TIMESTEPS = "logit_normal"
TIMESTEP_DENSITY = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
PRECONDITION = True


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


class FlowMatchingTask(ImageGenerationTask):
    """A flow family's loss (SD3): each example's labels are its target, the factor its
    prediction is scaled by and its loss weight (`flow_labels`), so the loss is the one
    diffusers' SD3 LoRA script takes, w * (a * prediction - target)^2, averaged per example
    and then over examples."""

    @staticmethod
    def _squared_errors(prediction: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        packed = target.float().repeat(k, 1)
        shape = (-1, *(1,) * (prediction.ndim - 1))
        scale, weight = packed[:, -2].reshape(shape), packed[:, -1].reshape(shape)
        aim = packed[:, :-2].reshape(prediction.shape)
        return weight * (scale * prediction.float() - aim) ** 2


def flow_labels(latents: torch.Tensor, noise: torch.Tensor, noised: torch.Tensor,
                sigmas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Labels of flow-matching examples, (N, D + 2): with PRECONDITION (the SD3 script's
    default, EDM's preconditioning) the prediction v becomes -sigma * v + noised and is
    compared with the latents, i.e. -sigma * v against latents - noised; without it, v against
    the velocity noise - latents. The target flattened, then the factor on v, then the loss
    weight."""
    if PRECONDITION:
        target, scale = latents - noised, -sigmas
    else:
        target, scale = noise - latents, torch.ones_like(sigmas)
    return torch.cat([target.flatten(1), scale[:, None], weights[:, None]], dim=1)


def build_image_generation(study: Study, raw: RawSplits, parts: DiffusionParts,
                           seq_len: int) -> ImageGenerationTask:
    """Noised latents, timesteps, caption embeddings and targets of each split (`seq_len` does
    not apply: captions take the text encoders' own lengths)."""
    spec = study.task
    require_field(raw, spec.image_field, "task.image_field")
    if spec.prompt_field is not None:
        require_field(raw, spec.prompt_field, "task.prompt_field")
    family = parts.family
    prediction = parts.scheduler.config.get("prediction_type", "epsilon")
    if family.objective == "noise" and prediction not in ("epsilon", "v_prediction", "sample"):
        raise StudyError(f"model.source: its scheduler predicts '{prediction}'; image_generation "
                         "trains epsilon, v_prediction or sample denoisers")

    def encode(records: Records, split: str) -> Split:
        place = partial(image_place, raw, spec.image_field, records, split)
        crops = [square_crop(read_rgb(record[spec.image_field], place(i)), parts.resolution)
                 for i, record in enumerate(records)]
        pixels = torch.stack([pixels for pixels, _ in crops])
        captions = ["" if spec.prompt_field is None else str(record[spec.prompt_field])
                    for record in records]
        generator = torch.Generator().manual_seed(SPLIT_SEEDS[split])
        latents = _latents(parts, pixels, generator)
        noise = torch.randn(latents.shape, generator=generator)
        text = conditioning(parts, captions)
        if family.objective == "flow":
            return _flow_split(parts, latents, noise, text, generator)
        schedule = parts.scheduler
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(records),),
                                  generator=generator)
        target = {"epsilon": noise, "sample": latents}.get(prediction)
        if target is None:
            target = schedule.get_velocity(latents, noise, timesteps)
        inputs = {"sample": schedule.add_noise(latents, noise, timesteps),
                  "timestep": timesteps, "encoder_hidden_states": text["states"]}
        if family.added:  # SDXL: the pooled text and each image's size and crop
            inputs["text_embeds"] = text["pooled"]
            inputs["time_ids"] = torch.tensor([[*size, *corner, parts.resolution,
                                                 parts.resolution] for _, (size, corner) in crops],
                                              dtype=torch.float32)
        return Split(inputs, target)

    test = None if raw.test is None else encode(raw.test, "test")
    built = FlowMatchingTask if family.objective == "flow" else ImageGenerationTask
    return built(encode(raw.train, "training"), encode(raw.validation, "validation"), test)


def _flow_split(parts: DiffusionParts, latents: torch.Tensor, noise: torch.Tensor,
                text: dict[str, torch.Tensor], generator: torch.Generator) -> Split:
    """A flow family's examples as diffusers' SD3 LoRA script makes them: u from the
    TIMESTEPS density (logit-normal), the schedule's timestep and sigma at u's index, the
    latents noised on the straight line (1 - sigma) * latents + sigma * noise, the loss weight
    of the scheme (1 for logit-normal)."""
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )

    schedule = parts.scheduler
    u = compute_density_for_timestep_sampling(TIMESTEPS, len(latents), generator=generator,
                                              **TIMESTEP_DENSITY)
    index = (u * schedule.config.num_train_timesteps).long()
    timesteps = schedule.timesteps[index].float()
    sigmas = schedule.sigmas[index].float()
    line = sigmas.reshape(-1, *(1,) * (latents.ndim - 1))
    noised = (1.0 - line) * latents + line * noise
    weights = compute_loss_weighting_for_sd3(TIMESTEPS, sigmas=sigmas).float()
    return Split({"hidden_states": noised, "timestep": timesteps,
                  "encoder_hidden_states": text["states"],
                  "pooled_projections": text["pooled"]},
                 flow_labels(latents, noise, noised, sigmas, weights))


def square_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as the VAE takes it: shorter side resized to `size`, centre-cropped to a
    square, values in [-1, 1], shape (3, size, size)."""
    return square_crop(image, size)[0]


def square_crop(image: Image.Image, size: int
                ) -> tuple[torch.Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    """square_pixels, with the image's original (height, width) and the crop's (top, left)
    corner in the resized image: SDXL's time ids, as its training scripts take them."""
    original = (image.height, image.width)
    scale = size / min(image.size)
    width, height = (max(size, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = values.reshape(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1
    return pixels, (original, (top, left))


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


