"""Base models and tokenizers: packaged offline models, local folders, hub ids, tiny test models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lorasweep.config import ModelSpec
from lorasweep.errors import StudyError
from lorasweep.packaged_models import (
    PACKAGED_MODELS,
    ModelNotAvailableError,
    packaged_model_path,
)
from lorasweep.quantize import check_quantize, quantize_base

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Small random models built from a config: real architectures, seconds to train, for tests.
TINY_CONFIGS = {
    "tiny:bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=128),
    "tiny:llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=128, pad_token_id=0, bos_token_id=101,
                       eos_token_id=102),
}


def _auto_class(kind: str) -> type:
    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of the model (tiny models borrow MiniLM's, which ships offline)."""
    source = _resolve_source("minilm" if spec.source in TINY_CONFIGS else spec.source)
    if spec.trust_remote_code:  # the tokenizer is loaded first: said once, before any code runs
        print(f"lorasweep: model.trust_remote_code: the Python code in {spec.source} runs, as "
              "you, with your permissions", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StudyError(f"model.source: the tokenizer of '{spec.source}' has neither a pad "
                             "nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # batches are trimmed and masked on the right
    return tokenizer


def load_model(spec: ModelSpec, kind: str, num_labels: int | None,
               tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The base model in fp32 on the CPU (its block linears in NF4 with `quantize: nf4`), in
    eval mode (dropout off, see train.py)."""
    check_quantize(spec.quantize)
    auto = _auto_class(kind)
    extra = {"num_labels": num_labels} if kind == "classification" else {}
    if spec.source in TINY_CONFIGS:
        config = AutoConfig.for_model(**TINY_CONFIGS[spec.source],
                                      vocab_size=len(tokenizer), **extra)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = auto.from_config(config)
    else:
        _refuse_pickle_only(spec.source)
        try:
            model = auto.from_pretrained(_resolve_source(spec.source), revision=spec.revision,
                                         trust_remote_code=spec.trust_remote_code,
                                         dtype=torch.float32, **extra)
        except (OSError, ValueError) as exc:
            raise StudyError(_load_error(spec, exc)) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
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
    if spec.source in TINY_CONFIGS:
        return int(TINY_CONFIGS[spec.source]["max_position_embeddings"])
    try:
        config = AutoConfig.from_pretrained(_resolve_source(spec.source), revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_width(spec: ModelSpec) -> int:
    """The model's hidden size (muA's width n), from its config alone."""
    if spec.source in TINY_CONFIGS:
        return int(TINY_CONFIGS[spec.source]["hidden_size"])
    try:
        config = AutoConfig.from_pretrained(_resolve_source(spec.source), revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StudyError(_load_error(spec, exc)) from None
    width = getattr(config, "hidden_size", None)
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
    reason = str(exc).strip().splitlines()[0][:200]
    return (f"model.source: cannot load '{spec.source}' as a {where}: {reason}; allowed: "
            f"{', '.join(PACKAGED_MODELS)}, {', '.join(TINY_CONFIGS)}, a folder or a hub id")
