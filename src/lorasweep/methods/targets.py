"""Which layers an adapter goes on, and which modules are the task head.

Adapters go on `nn.Linear` layers and on transformers' `Conv1D` (GPT-2 and its relatives), which
computes x W + b with W stored transposed, (in, out); PEFT adapts it with `fan_in_fan_out=True`.
`all-linear` selects what PEFT's own `all-linear` selects for the same model and task type.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from lorasweep.config.search import REGEX_PREFIX, is_parts
from lorasweep.errors import StudyError
from lorasweep.kinds import kind_of

ADAPTABLE = (nn.Linear, Conv1D)
ADAPTABLE_TEXT = "nn.Linear or transformers' Conv1D"
# Leaf names (lower-cased) that mark an attention projection even where no parent module's name
# contains "attn" or "attention".
ATTENTION_LEAVES = {"query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
                    "c_attn", "query_key_value", "wqkv"}
# Module names that place a vision-language model's layer in its projector (LLaVA's
# multi_modal_projector, Qwen2-VL's visual.merger and Qwen3-VL's deepstack mergers, Idefics3's
# and SmolVLM's connector, BLIP-2's Q-Former and language_projection, Fuyu's linear patch
# embedding) or vision tower (vision_tower, Qwen's visual, Idefics3's vision_model); every other
# layer is the language model's (lm_head and embeddings included). The projector is checked
# first: Qwen's merger sits inside its visual tower. docs/vision-language.md's table shows what
# they find in every model transformers builds for image-text-to-text.
PROJECTOR_NAMES = {"multi_modal_projector", "merger", "deepstack_merger_list", "connector",
                   "mm_projector", "projector", "vision_projection", "aligner",
                   "language_projection", "qformer", "visual_projection",
                   "image_to_text_projection", "resampler_model", "vision_embed_tokens"}
VISION_NAMES = {"vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder",
                "vision_backbone", "vision", "image_tower", "video_tower"}
# Attribute names transformers uses for a freshly initialized classification head (PEFT's
# SEQ_CLS_HEAD_NAMES).
HEAD_NAMES = ("classifier", "score")


# The classes transformers builds a classifier with: their heads are freshly initialized.
CLASSIFIER_CLASSES = {name for mapping in (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                                           MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
                      for names in mapping.values()
                      for name in ((names,) if isinstance(names, str) else names)}


def head_module_names(model: nn.Module) -> list[str]:
    """The task head's top-level module names (empty for a causal LM, whose head is pretrained):
    `classifier` or `score`, and in a transformers classifier every other top-level module
    outside the backbone that ends in the logits (a layer of num_labels outputs: DeiT's and
    LeViT's distillation heads, SwiftFormer's `head` and `dist_head`, HGNetV2's `fc`), which
    would otherwise stay at their random init."""
    named = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if type(model).__name__ not in CLASSIFIER_CLASSES:
        return named
    labels, backbone = model.config.num_labels, getattr(model, "base_model_prefix", "")
    return named + [name for name, child in model.named_children()
                    if name not in named and name != backbone
                    and any(isinstance(m, nn.Linear) and m.out_features == labels
                            for m in child.modules())]


def head_save_names(model: nn.Module) -> list[str]:
    """The head as PEFT's modules_to_save names it: PEFT cannot wrap a container, so a head
    that is a ModuleList or ModuleDict (HGNetV2's, TextNet's) is named by its members that hold
    weights."""
    names = []
    for head in head_module_names(model):
        module = model.get_submodule(head)
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            names += [f"{head}.{child}" for child, part in module.named_children()
                      if any(True for _ in part.parameters())]
        else:
            names.append(head)
    return names


def peft_task(kind: str, model: nn.Module) -> dict:
    """A LoraConfig's arguments that tell PEFT the task: its task type for text (a SEQ_CLS model
    saves its head); for an image classifier the head as modules_to_save, as PEFT's own image
    classification guide gives it (PEFT's all-linear then leaves the head out too)."""
    task_type = kind_of(kind).peft_task_type
    heads = head_save_names(model)
    if task_type is None:
        return {"modules_to_save": heads}
    # PEFT's SEQ_CLS saves `classifier` and `score` itself; a head named otherwise (BART's
    # classification_head, XLNet's logits_proj) it must be told of
    others = [name for name in heads if name.split(".")[0] not in HEAD_NAMES]
    return {"task_type": task_type, **({"modules_to_save": others} if others else {})}


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of an adaptable layer."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), like nn.Linear's: a transposed view of a Conv1D's, so
    in-place edits reach the layer."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _in_head(name: str, heads: list[str]) -> bool:
    return any(name == head or name.startswith(head + ".") for head in heads)


def adaptable_layers(model: nn.Module) -> list[str]:
    """Every nn.Linear and Conv1D outside the task head, in model order.

    The task head trains fully under every method (methods/base.py), so no adapter goes on it.
    """
    heads = head_module_names(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, ADAPTABLE) and not _in_head(name, heads)]


def all_linear(model: nn.Module) -> list[str]:
    """PEFT's `all-linear` (tuners_utils._maybe_include_all_linear_layers): every nn.Linear and
    Conv1D, inside the numbered blocks or not (BERT's pooler.dense, OPT-350m's project_in and
    project_out), except the layer the model reports as its output embeddings (the LM head) and
    the task head (PEFT leaves it to modules_to_save for a SEQ_CLS model)."""
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if getter is not None else None
    return [name for name in adaptable_layers(model)
            if output is None or model.get_submodule(name) is not output]


def part_of(name: str) -> str:
    """The part of a vision-language model a module or parameter is in: projector, vision or
    language (config/search.PARTS); a text model is all language."""
    components = name.split(".")
    if any(c in PROJECTOR_NAMES for c in components):
        return "projector"
    if any(c in VISION_NAMES for c in components):
        return "vision"
    return "language"


def in_parts(name: str, parts: str) -> bool:
    """Whether a module or parameter is in the "+"-joined `parts` (a target_modules value)."""
    return part_of(name) in parts.split("+")


def is_attention(name: str) -> bool:
    """Whether a layer is an attention projection: a path component naming attention (attn,
    self_attn, attention, self_attention, crossattention, ...) or an attention leaf name."""
    parts = name.lower().split(".")
    return (any("attn" in part or "attention" in part for part in parts[:-1])
            or parts[-1] in ATTENTION_LEAVES)


def in_block(name: str) -> bool:
    """Whether a layer sits inside a numbered transformer block (a number in its path)."""
    return any(part.isdigit() for part in name.split("."))


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """Module names for a preset, parts, or comma-joined names.

    `all-linear`: as PEFT's (see all_linear). `attention` / `mlp`: the layers of the numbered
    blocks that are / are not attention projections. Parts (`language+projector`): all-linear's
    layers in those parts of a vision-language model (part_of). Names match a layer's full name
    or its last components (`c_attn`, `attn.c_proj`), as PEFT matches a list, and a `re:`
    pattern full-matches a layer's full name, as PEFT matches a string, among every nn.Linear
    and Conv1D outside the task head; a name that reaches another kind of module, or the task
    head, is refused with that module's name.
    """
    if targets == "all-linear":
        chosen = all_linear(model)
    elif is_parts(targets):
        chosen = [name for name in all_linear(model) if in_parts(name, targets)]
    elif targets in ("attention", "mlp"):
        chosen = [name for name in adaptable_layers(model)
                  if in_block(name) and is_attention(name) == (targets == "attention")]
    else:
        chosen = _named(model, targets.split(","))
    if not chosen:
        raise StudyError(f"search.target_modules: '{targets}' matches no layer of the model; "
                         f"{_layer_summary(model)}")
    return chosen


def _named(model: nn.Module, names: list[str]) -> list[str]:
    """Layers whose full name is, or ends in, one of `names`; any other module so named is an
    error that names its type."""
    heads = head_module_names(model)
    chosen = []
    patterns = [re.compile(n[len(REGEX_PREFIX):]) for n in names if n.startswith(REGEX_PREFIX)]
    plain = [n for n in names if not n.startswith(REGEX_PREFIX)]
    for name, module in model.named_modules():
        if not (any(name == n or name.endswith("." + n) for n in plain)
                or any(p.fullmatch(name) for p in patterns)):
            continue
        if _in_head(name, heads):
            raise StudyError(f"search.target_modules: {name} is part of the task head, which "
                             "trains fully under every method; name other layers")
        if not isinstance(module, ADAPTABLE):
            raise StudyError(f"search.target_modules: {name} is of type "
                             f"{type(module).__name__}, not an {ADAPTABLE_TEXT} layer, and "
                             "cannot be adapted")
        chosen.append(name)
    return chosen


def _layer_summary(model: nn.Module) -> str:
    """What the model offers instead: its adaptable layers' last names, or the fact it has none."""
    layers = adaptable_layers(model)
    if not layers:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules()})
        return f"it has no {ADAPTABLE_TEXT} layer outside the task head (its modules: " \
               f"{', '.join(kinds)})"
    kinds = sorted({name.split(".")[-1] for name in layers})
    return f"its layers end in: {', '.join(kinds)}"


def uses_conv1d(model: nn.Module, names: list[str]) -> bool:
    """Whether any of these layers is a Conv1D (PEFT then wants fan_in_fan_out=True)."""
    return any(isinstance(model.get_submodule(name), Conv1D) for name in names)


def adapter_width(model: nn.Module, targets: str) -> int:
    """Sum of in + out features over the targeted layers: a rank-r LoRA trains r times this."""
    return sum(sum(layer_shape(model.get_submodule(name)))
               for name in resolve_targets(model, targets))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
