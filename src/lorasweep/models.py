"""Base models and their preprocessors (a tokenizer, an image processor for image kinds, or a
diffusion pipeline's frozen parts for image generation): packaged offline models, local folders,
hub ids, and models built from a config with random weights (tiny ones for tests, published
sizes for benchmarks)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from huggingface_hub import hf_hub_download
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ViTImageProcessorPil,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from lorasweep.config import ModelSpec
from lorasweep.denoisers import FAMILIES, Family, family_of
from lorasweep.errors import StudyError, first_line
from lorasweep.kinds import DENOISER, kind_of
from lorasweep.packaged_models import (
    PACKAGED_MODELS,
    ModelNotAvailableError,
    packaged_model_path,
)
from lorasweep.quantize import check_quantize, quantize_base

if TYPE_CHECKING:  # diffusers is imported where a diffusion kind loads it: 2 s other kinds skip
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Small random models built from a config: real architectures, seconds to train, for tests.
TINY_CONFIGS = {
    "tiny:bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=128),
    "tiny:llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=128, pad_token_id=0, bos_token_id=101,
                       eos_token_id=102),
    "tiny:vit": dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, image_size=32, patch_size=8),
    # ConvNeXt: its pointwise convolutions are nn.Linear layers, its other convolutions are not
    "tiny:convnext": dict(model_type="convnext", hidden_sizes=[16, 32], depths=[1, 1],
                          num_stages=2, image_size=32, patch_size=4),
}
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
# Published architectures with random weights, for throughput and memory at real size (the LR
# science needs pretrained weights). Values from each model's config.json on the Hugging Face Hub
# (meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B, Qwen/Qwen2-0.5B).
RANDOM_CONFIGS = {
    "random:llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                            intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5,
                            max_position_embeddings=131072, tie_word_embeddings=True,
                            rope_parameters=dict(rope_theta=500000.0, factor=32.0,
                                                 **_LLAMA3_ROPE)),
    "random:llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5,
                            max_position_embeddings=131072, tie_word_embeddings=False,
                            rope_parameters=dict(rope_theta=500000.0, factor=8.0,
                                                 **_LLAMA3_ROPE)),
    "random:qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2,
                              intermediate_size=4864, vocab_size=151936, rms_norm_eps=1e-6,
                              max_position_embeddings=131072, tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
}
CONFIG_SOURCES = {**TINY_CONFIGS, **RANDOM_CONFIGS}


# The only libraries a pipeline's model_index.json may name a part's class from: a class is
# looked up by name in one of these, never imported from a path the pipeline chooses.
PIPELINE_LIBRARIES = ("diffusers", "transformers")


@dataclass
class DiffusionParts:
    """The frozen parts of a diffusion pipeline that make the denoiser's inputs, once per
    dataset (tasks/image_generation.py): the VAE (images to latents), the text encoders and
    their tokenizers (captions to embeddings, in the family's order; None where a pipeline
    leaves an optional one out, as SD3 may T5), the noise schedule (DDPM's, or a
    FlowMatchEulerDiscreteScheduler for a flow family), and the image size the denoiser was
    built for (its latent sample size times the VAE's downscaling). None of them trains, and
    none runs on a training step."""

    vae: AutoencoderKL
    encoders: list[tuple[nn.Module, PreTrainedTokenizerBase] | None]
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    resolution: int
    family: Family = FAMILIES["sd"]
    denoiser_config: dict = field(default_factory=dict)

    @property
    def text_encoder(self) -> nn.Module:
        """The first text encoder (every family has one)."""
        return self.encoders[0][0]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.encoders[0][1]


# What turns raw examples into model inputs.
Preprocessor = PreTrainedTokenizerBase | BaseImageProcessor | ProcessorMixin | DiffusionParts


def _auto_class(kind: str) -> type:
    """The transformers auto class the kind's base model loads as (kinds.Kind.model)."""
    return getattr(transformers, kind_of(kind).model)


def load_preprocessor(spec: ModelSpec, kind: str) -> Preprocessor:
    """What turns the kind's examples into model inputs (kinds.Kind.preprocessor): its
    tokenizer, image processor, or a diffusion pipeline's frozen parts."""
    return PREPROCESSORS[kind_of(kind).preprocessor](spec)


def pipeline_index(spec: ModelSpec) -> tuple[str, dict, Family]:
    """The pipeline's folder (or hub id), its model_index.json and its denoiser's family, read
    before anything else loads: a layout image_generation does not train is one line."""
    source = _resolve_source(spec.source)
    try:
        if Path(source).is_dir():
            index_file = Path(source) / "model_index.json"
        else:
            index_file = Path(hf_hub_download(source, "model_index.json", revision=spec.revision))
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            raise ValueError("its model_index.json is not a JSON object")
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None
    try:
        return source, index, family_of(index)
    except ValueError as exc:
        raise StudyError(f"model.source: '{spec.source}': {exc}") from None


def _pipeline_part(spec: ModelSpec, part: str, dtype: torch.dtype = torch.float32,
                   optional: bool = False) -> object:
    """One part of a diffusers pipeline (a folder or hub id laid out as diffusers lays one out:
    unet or transformer, vae, text_encoder(s), tokenizer(s), scheduler), of the class its
    model_index.json names, from safetensors only (a pickle checkpoint is not loaded, as for
    every other model); None for an `optional` part the index leaves out (null)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    source, index, family = pipeline_index(spec)
    try:
        library, name = index.get(part) or (None, None)
        if optional and name is None:
            return None
        if library not in PIPELINE_LIBRARIES:
            raise ValueError(f"its model_index.json names no {part} from "
                             f"{' or '.join(PIPELINE_LIBRARIES)}")
        cls = getattr(importlib.import_module(library), name)
        if part.startswith("tokenizer"):
            return cls.from_pretrained(source, subfolder=part, revision=spec.revision)
        if part == "scheduler":  # training noises as the family's objective does
            schedule = (FlowMatchEulerDiscreteScheduler if family.objective == "flow"
                        else DDPMScheduler)  # DDPM's with the pipeline's betas
            return schedule.from_pretrained(source, subfolder=part, revision=spec.revision)
        return cls.from_pretrained(source, subfolder=part, revision=spec.revision,
                                   use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError, AttributeError) as exc:
        raise StudyError(_load_error(spec, exc)) from None


def load_diffusion_parts(spec: ModelSpec) -> DiffusionParts:
    """The pipeline's VAE, text encoders, tokenizers and noise schedule, frozen, fp32, eval."""
    _, _, family = pipeline_index(spec)
    vae = _pipeline_part(spec, "vae")
    encoders = []
    for name in family.encoders:
        encoder = _pipeline_part(spec, name, optional=name in family.optional)
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        encoders.append(None if encoder is None else (
            encoder.eval().requires_grad_(False), _pipeline_part(spec, tokenizer_name)))
    config = _denoiser_config(spec, family)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return DiffusionParts(vae=vae.eval().requires_grad_(False), encoders=encoders,
                          scheduler=_pipeline_part(spec, "scheduler"),
                          resolution=config["sample_size"] * scale, family=family,
                          denoiser_config=dict(config))


def _denoiser_config(spec: ModelSpec, family: Family) -> dict:
    """The denoiser's config alone (its sample size), without its weights."""
    import diffusers

    try:
        return getattr(diffusers, family.model_class).load_config(
            _resolve_source(spec.source), subfolder=family.folder, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None


def load_denoiser(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The pipeline's denoiser, the model image_generation trains, of its family
    (denoisers.FAMILIES): a text-conditioned UNet2DConditionModel (Stable Diffusion 1.x/2.x),
    SDXL's UNet with its added conditioning (which then takes `text_embeds` and `time_ids` as
    keyword arguments: take_added_conditioning), or SD3's transformer."""
    if spec.quantize is not None:
        raise StudyError("model.quantize: nf4 quantizes a transformers model's block linears; "
                         "an image_generation denoiser is not one; remove it")
    _, _, family = pipeline_index(spec)
    model = _pipeline_part(spec, family.folder, dtype)
    extra = getattr(model.config, "addition_embed_type", None)
    if type(model).__name__ != family.model_class or extra != family.added:
        raise StudyError(f"model.source: the denoiser of '{spec.source}' is a "
                         f"{type(model).__name__}{f' with {extra} conditioning' if extra else ''}"
                         f"; a {family.title} pipeline's is a {family.model_class}"
                         f"{f' with {family.added} conditioning' if family.added else ''}")
    if family.added:
        take_added_conditioning(model)
    return model


def _added_conditioning(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """SDXL's pooled text embeddings and time ids, given as keyword arguments, passed as the
    UNet's added_cond_kwargs."""
    if "text_embeds" in kwargs:
        kwargs = dict(kwargs)
        kwargs["added_cond_kwargs"] = {"text_embeds": kwargs.pop("text_embeds"),
                                       "time_ids": kwargs.pop("time_ids")}
    return args, kwargs


def take_added_conditioning(unet: nn.Module) -> nn.Module:
    """An SDXL UNet that takes `text_embeds` and `time_ids` as plain keyword arguments (a
    forward pre-hook), so its inputs are a flat dict of tensors as every Split's are (fused
    groups repeat them, logits_of casts them): the module and its parameter names stay the
    UNet's own, so adapters export as diffusers names them."""
    unet.register_forward_pre_hook(_added_conditioning, with_kwargs=True)
    return unet


def _say_remote_code(spec: ModelSpec) -> None:
    """The preprocessor is loaded first: said once, before any of the model's code runs."""
    if spec.trust_remote_code:
        print(f"lorasweep: model.trust_remote_code: the Python code in {spec.source} runs, as "
              "you, with your permissions", file=sys.stderr)


def load_image_processor(spec: ModelSpec) -> BaseImageProcessor:
    """The model's own image processor (resize, rescale, normalize to what it was trained on);
    models built from a config get a plain resize to their config's image size. Always its PIL
    form: the torchvision form, where torchvision is installed, gives other pixel values, and a
    study's numbers must not depend on what else is installed."""
    if spec.source in CONFIG_SOURCES:
        size = CONFIG_SOURCES[spec.source].get("image_size", 224)
        return ViTImageProcessorPil(size={"height": size, "width": size})
    _say_remote_code(spec)
    try:
        return AutoImageProcessor.from_pretrained(_resolve_source(spec.source),
                                                  revision=spec.revision, backend="pil",
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None


def load_processor(spec: ModelSpec) -> ProcessorMixin:
    """A vision-language model's own processor: its tokenizer, its image processor (the PIL
    form, as load_image_processor says why) and its chat template, which the task renders."""
    if spec.source in CONFIG_SOURCES:
        raise StudyError(f"model.source: '{spec.source}' has no processor of text and images; "
                         "a vision_language task needs a model folder or hub id that has one")
    _say_remote_code(spec)
    try:
        processor = AutoProcessor.from_pretrained(_resolve_source(spec.source),
                                                  revision=spec.revision, backend="pil",
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise StudyError(_load_error(spec, exc)) from None
    if not isinstance(processor, ProcessorMixin) or not all(
            isinstance(getattr(processor, part, None), kind) for part, kind in
            (("tokenizer", PreTrainedTokenizerBase), ("image_processor", BaseImageProcessor))):
        what = ("a tokenizer only" if isinstance(processor, PreTrainedTokenizerBase)
                else f"a {type(processor).__name__}")
        raise StudyError(f"model.source: '{spec.source}' has no processor of text and images "
                         f"(its AutoProcessor is {what}); a "
                         "vision_language task needs one (processor_config.json or "
                         "preprocessor_config.json beside a tokenizer)")
    _pad_right(processor.tokenizer, spec)
    return processor


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of the model (models built from a config borrow MiniLM's, which ships
    offline: its ids fit every vocabulary here)."""
    source = _resolve_source("minilm" if spec.source in CONFIG_SOURCES else spec.source)
    _say_remote_code(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None
    return _pad_right(tokenizer, spec)


def _pad_right(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer padding on the right (batches are trimmed and masked there), with its eos
    token as the pad token where it has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StudyError(f"model.source: the tokenizer of '{spec.source}' has neither a pad "
                             "nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # batches are trimmed and masked on the right
    return tokenizer


# Each kind's preprocessor by its name in kinds.Kind.preprocessor.
PREPROCESSORS: dict[str, Callable[[ModelSpec], Preprocessor]] = {
    "tokenizer": load_tokenizer, "image_processor": load_image_processor,
    "processor": load_processor, "diffusion_parts": load_diffusion_parts}


def load_model(spec: ModelSpec, kind: str, num_labels: int | None,
               preprocessor: Preprocessor, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model in `dtype` on the CPU (its block linears in NF4 with `quantize: nf4`), in
    eval mode (dropout off, see train.py). A classifier's head has `num_labels` outputs; a
    pretrained head of another size is left out (its weights are drawn per trial anyway)."""
    if kind_of(kind).model == DENOISER:
        return load_denoiser(spec, dtype).eval()
    check_quantize(spec.quantize)
    tokenizer = preprocessor if isinstance(preprocessor, PreTrainedTokenizerBase) else getattr(
        preprocessor, "tokenizer", None)  # a vision-language processor's
    extra = ({"num_labels": num_labels, "ignore_mismatched_sizes": True}
             if kind_of(kind).labels else {})
    if spec.source in CONFIG_SOURCES:
        # tiny models are drawn in fp32 and then rounded, so a bf16 base is the fp32 one stored
        # in bf16; published sizes are drawn in their dtype (an 8B model in fp32 is 32 GB)
        tiny = spec.source in TINY_CONFIGS
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = build_from_config(spec.source, kind, num_labels,
                                          None if tokenizer is None else len(tokenizer),
                                          torch.float32 if tiny else dtype)
        except ValueError as exc:  # a text model for an image kind, or the other way round
            raise StudyError(f"model.source: '{spec.source}' cannot be built for task.kind "
                             f"{kind} ({first_line(exc)})") from None
        model = model.to(dtype)
    else:
        _refuse_pickle_only(spec.source)
        try:
            model = _auto_class(kind).from_pretrained(
                _resolve_source(spec.source), revision=spec.revision,
                trust_remote_code=spec.trust_remote_code, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise StudyError(_load_error(spec, exc)) from None
    text_config = model.config.get_text_config()  # a vision-language model's text model's
    if tokenizer is not None and getattr(text_config, "pad_token_id", None) is None:
        text_config.pad_token_id = tokenizer.pad_token_id
    if spec.quantize is not None:
        quantize_base(model, spec.quantize)
    return model.eval()


def _refuse_pickle_only(source: str) -> None:
    """A local folder whose weights are only pickle files: loading one can run code, so neither
    lorasweep nor transformers (with this torch) will; say so instead of a long traceback."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise StudyError(f"model.source: {source} holds only {', '.join(pickles[:3])}: pickle "
                         "checkpoints are not loaded; convert to safetensors")


def max_positions(spec: ModelSpec) -> int | None:
    """The longest sequence the model's position embeddings cover, from its config alone (None:
    the config does not say)."""
    if spec.source in CONFIG_SOURCES:
        return CONFIG_SOURCES[spec.source].get("max_position_embeddings")  # images: none
    config = _config(spec)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_from_config(source: str, kind: str, num_labels: int | None, vocab_size: int | None,
                      dtype: torch.dtype, device: str | torch.device | None = None) -> nn.Module:
    """A `tiny:` or `random:` model with fresh random weights; on device "meta" no memory is
    allocated, to inspect an 8B model's shapes and parameter count on any machine. A tiny text
    model takes `vocab_size` (its tokenizer's; None for image models)."""
    values = dict(CONFIG_SOURCES[source])
    if source in TINY_CONFIGS and vocab_size is not None:
        values["vocab_size"] = vocab_size  # published models keep their own vocabulary size
    extra = {"num_labels": num_labels} if kind_of(kind).labels else {}
    config = AutoConfig.for_model(**values, **extra)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return _auto_class(kind).from_config(config, dtype=dtype)


def _config(spec: ModelSpec) -> PretrainedConfig:
    """The model's config alone, without its weights."""
    try:
        return AutoConfig.from_pretrained(_resolve_source(spec.source), revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None


def model_width(spec: ModelSpec) -> int:
    """The model's hidden size (muA's width n), from its config alone."""
    width = (CONFIG_SOURCES[spec.source].get("hidden_size") if spec.source in CONFIG_SOURCES
             else getattr(_config(spec), "hidden_size", None))
    if not isinstance(width, int):
        raise StudyError(f"model.source: the config of '{spec.source}' names no hidden_size; "
                         "give --source-width")
    return width


def _resolve_source(source: str) -> str:
    if source in PACKAGED_MODELS:
        try:
            return str(packaged_model_path(source))
        except ModelNotAvailableError as exc:
            raise StudyError(f"model.source: {exc}") from None
    return source


def _load_error(spec: ModelSpec, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    where = "local folder" if Path(spec.source).exists() else (
        "hub id (offline: HF_HUB_OFFLINE=1)" if offline else "hub id")
    reason = first_line(exc)
    return (f"model.source: cannot load '{spec.source}' as a {where}: {reason}; allowed: "
            f"{', '.join(PACKAGED_MODELS)}, {', '.join(CONFIG_SOURCES)}, a folder or a hub id")

