"""What each denoiser family image_generation trains is, in one table, read from a pipeline's
model_index.json before any weights or configs load.

A diffusion pipeline names its denoiser's folder and class in model_index.json (`unet`:
UNet2DConditionModel, `transformer`: SD3Transformer2DModel, FluxTransformer2DModel, ...), its
text encoders beside it. The family decides everything the task and the loader must do
differently: which folder holds the denoiser, which text encoders make its conditioning (and
which of them a pipeline may leave out), and which objective it trains on (noise prediction
on a DDPM schedule, or flow matching). Reading the index first makes a layout lorasweep does
not train (a Flux or DiT pipeline) one line naming what it is, not a missing config.json.

No torch here: the family is a name; models.py loads its classes, tasks/image_generation.py
makes its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Denoiser classes of pipelines lorasweep does not train, and what they are, for the refusal.
OTHER_DENOISERS = {
    "FluxTransformer2DModel": "Flux",
    "DiTTransformer2DModel": "DiT (class-conditioned)",
    "PixArtTransformer2DModel": "PixArt",
    "SanaTransformer2DModel": "Sana",
    "UNet2DModel": "an unconditional UNet",
}


@dataclass(frozen=True)
class Family:
    """A denoiser family: `folder` is its model_index.json key and subfolder, `model_class`
    its diffusers class; `encoders` the text encoders (and tokenizers, same suffix) its
    conditioning is made from, in the pipeline's order, `optional` those a pipeline may set to
    null (SD3 without T5: its sequence part is zeros, as diffusers' pipeline makes it);
    `added`: the UNet's addition_embed_type (SDXL's pooled text and time ids); `objective`:
    `noise` (DDPM noise schedule; epsilon, v or sample prediction) or `flow` (rectified flow:
    the velocity noise - latents at sigmas of a FlowMatchEulerDiscreteScheduler)."""

    name: str
    title: str
    folder: Literal["unet", "transformer"]
    model_class: str
    encoders: tuple[str, ...]
    objective: Literal["noise", "flow"]
    optional: tuple[str, ...] = ()
    added: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The keyword arguments its denoiser takes from a Split (tasks/image_generation.py)."""
        if self.objective == "flow":
            return ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
        extra = ("text_embeds", "time_ids") if self.added else ()
        return ("sample", "timestep", "encoder_hidden_states", *extra)


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("sd", "Stable Diffusion 1.x/2.x", "unet", "UNet2DConditionModel", ("text_encoder",),
           "noise"),
    Family("sdxl", "Stable Diffusion XL", "unet", "UNet2DConditionModel",
           ("text_encoder", "text_encoder_2"), "noise", added="text_time"),
    Family("sd3", "Stable Diffusion 3/3.5", "transformer", "SD3Transformer2DModel",
           ("text_encoder", "text_encoder_2", "text_encoder_3"), "flow",
           optional=("text_encoder_3",)),
)}
# What the kind trains, for refusals: each class with the families it serves.
TRAINED = " or ".join(
    f"{cls} ({', '.join(f.title for f in FAMILIES.values() if f.model_class == cls)})"
    for cls in dict.fromkeys(f.model_class for f in FAMILIES.values()))


def _named(index: dict, part: str) -> str | None:
    """The class a model_index.json entry names (None: absent, or null as optional parts
    are)."""
    entry = index.get(part)
    if not isinstance(entry, list | tuple) or len(entry) != 2 or entry[1] is None:
        return None
    return str(entry[1])


def family_of(index: dict) -> Family:
    """The family of a pipeline from its model_index.json alone; ValueError, one line, for a
    denoiser this kind does not train."""
    for folder in ("transformer", "unet"):
        named = _named(index, folder)
        if named is None:
            continue
        found = [f for f in FAMILIES.values()
                 if f.folder == folder and f.model_class == named]
        if not found:
            what = OTHER_DENOISERS.get(named)
            raise ValueError(f"its model_index.json names a {named} denoiser in {folder}/"
                             f"{f' ({what})' if what else ''}; image_generation trains {TRAINED}")
        if len(found) > 1:  # a UNet: SDXL's pipelines have a second text encoder
            found = [f for f in found if all(_named(index, e) for e in f.encoders)][-1:]
        if not found:
            raise ValueError("its model_index.json names no text_encoder")
        return found[0]
    raise ValueError("its model_index.json names no unet or transformer denoiser; "
                     f"image_generation trains {TRAINED}")
