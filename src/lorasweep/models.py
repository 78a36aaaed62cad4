"""Base models and tokenizers: packaged offline models, local folders, hub ids, and models built
from a config with random weights (tiny ones for tests, published sizes for benchmarks)."""

from __future__ import annotations

import contextlib
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
    PretrainedConfig,
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


def _auto_class(kind: str) -> type:
    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of the model (models built from a config borrow MiniLM's, which ships
    offline: its ids fit every vocabulary here)."""
    source = _resolve_source("minilm" if spec.source in CONFIG_SOURCES else spec.source)
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
               tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32
               ) -> nn.Module:
    """The base model in `dtype` on the CPU (its block linears in NF4 with `quantize: nf4`), in
    eval mode (dropout off, see train.py)."""
    check_quantize(spec.quantize)
    extra = {"num_labels": num_labels} if kind == "classification" else {}
    if spec.source in CONFIG_SOURCES:
        # tiny models are drawn in fp32 and then rounded, so a bf16 base is the fp32 one stored
        # in bf16; published sizes are drawn in their dtype (an 8B model in fp32 is 32 GB)
        tiny = spec.source in TINY_CONFIGS
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_from_config(spec.source, kind, num_labels, len(tokenizer),
                                      torch.float32 if tiny else dtype)
        model = model.to(dtype)
    else:
        _refuse_pickle_only(spec.source)
        try:
            model = _auto_class(kind).from_pretrained(
                _resolve_source(spec.source), revision=spec.revision,
                trust_remote_code=spec.trust_remote_code, dtype=dtype, **extra)
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
    if spec.source in CONFIG_SOURCES:
        return int(CONFIG_SOURCES[spec.source]["max_position_embeddings"])
    config = _config(spec)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_from_config(source: str, kind: str, num_labels: int | None, vocab_size: int,
                      dtype: torch.dtype, device: str | torch.device | None = None) -> nn.Module:
    """A `tiny:` or `random:` model with fresh random weights; on device "meta" no memory is
    allocated, to inspect an 8B model's shapes and parameter count on any machine."""
    values = dict(CONFIG_SOURCES[source])
    if source in TINY_CONFIGS:
        values["vocab_size"] = vocab_size  # published models keep their own vocabulary size
    extra = {"num_labels": num_labels} if kind == "classification" else {}
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
    if spec.source in CONFIG_SOURCES:
        return int(CONFIG_SOURCES[spec.source]["hidden_size"])
    width = getattr(_config(spec), "hidden_size", None)
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
            f"{', '.join(PACKAGED_MODELS)}, {', '.join(CONFIG_SOURCES)}, a folder or a hub id")
