"""Which linear layers an adapter goes on, and which modules are the task head."""

from __future__ import annotations

from torch import nn

from lorasweep.errors import StudyError

# Path components that mark an attention projection across BERT- and Llama-style models.
ATTENTION_PARTS = {"attention", "attn", "self_attn", "query", "key", "value",
                   "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn"}
# Attribute names transformers uses for a freshly initialized classification head.
HEAD_NAMES = ("classifier", "score")


def head_module_names(model: nn.Module) -> list[str]:
    """The task head's top-level module names (empty for a causal LM, whose head is pretrained)."""
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def block_linears(model: nn.Module) -> list[str]:
    """Linear layers inside the transformer blocks (a numbered layer in the path), in order.

    This leaves out the task head, the pooler and the LM head, as PEFT's `all-linear` does.
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(part.isdigit() for part in name.split("."))]


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """Module names for a preset (`attention`, `mlp`, `all-linear`) or comma-joined suffixes."""
    candidates = block_linears(model)

    def is_attention(name: str) -> bool:
        return any(part in ATTENTION_PARTS for part in name.split("."))

    if targets == "all-linear":
        chosen = candidates
    elif targets == "attention":
        chosen = [name for name in candidates if is_attention(name)]
    elif targets == "mlp":
        chosen = [name for name in candidates if not is_attention(name)]
    else:
        suffixes = targets.split(",")
        chosen = [name for name in candidates
                  if any(name == s or name.endswith("." + s) for s in suffixes)]
    if not chosen:
        kinds = sorted({name.split(".")[-1] for name in candidates})
        raise StudyError(f"search.target_modules: '{targets}' matches no linear layer of the "
                         f"model; its layers end in: {', '.join(kinds)}")
    return chosen


def adapter_width(model: nn.Module, targets: str) -> int:
    """Sum of in + out features over the targeted layers: a rank-r LoRA trains r times this."""
    return sum(model.get_submodule(name).in_features + model.get_submodule(name).out_features
               for name in resolve_targets(model, targets))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
