"""Tiny random vision-language models (image-text chat), built offline from configs.

Each family is saved with its processor to a folder that `AutoModelForImageTextToText` and
`AutoProcessor` load with no Hub access, so the image-text task is tested on the real
architectures (LLaVA, Qwen2-VL, Idefics3, ...) in a fraction of a second each. The sizes follow
transformers' own tests (hidden 32, 2 layers, 32x32 pixels); dropout, norms, activations and the
vision feature layer keep the config's defaults, since those decide how a model trains.

All families share one byte-level tokenizer (any text tokenizes, nothing is unknown) with the
family's special tokens, and one ChatML chat template, in which rendering the first turns (with
`add_generation_prompt`) is a prefix of rendering them all.

Two processors are stand-ins, because this project's environment has no torchvision (and no
num2words): Qwen's processors take a video processor, which exists only for torchvision, and
AutoProcessor loads every part a processor takes; SmolVLM's needs both. Where torchvision is
missing the Qwen families save PaddleOCR-VL's processor, which takes an image processor and a
tokenizer alone and expands the image token as Qwen's do, and SmolVLM always saves Idefics3's,
which lays out one unsplit image as SmolVLM's does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import is_torchvision_available

PIXELS = 32
VISION_PATCH = 8  # LLaVA's CLIP and Idefics3's SigLIP: 32x32 pixels are 4x4 patches
QWEN_PATCH = 4  # Qwen's patches, merged 2x2: a 32x32 image is 64 patches and 16 image tokens
# The language model of every family.
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=PIXELS, patch_size=VISION_PATCH)

CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
IDEFICS_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
                  *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def chat_template(image: str) -> str:
    """ChatML with `image` where each image entry is. A turn's text never depends on a later
    turn, so the first turns rendered with `add_generation_prompt` are a prefix of the whole
    conversation; the assistant's text is a generation block, for
    `return_assistant_tokens_mask`. Content may be a string or a list of entries."""
    content = (
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{- '" + image + "' -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}" + content + "{{- '<|im_end|>' -}}{%- endgeneration -%}"
        "{{- '\n' -}}"
        "{%- else -%}" + content + "{{- '<|im_end|>\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    )


def tokenizer(specials: tuple[str, ...], named: dict[str, str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with no merges: ids 0-255 are the bytes, then `specials` in order.

    Any text tokenizes (one token a byte), the vocabulary stays under 320, and the ids depend
    on nothing but `specials`, so a build is the same on every machine. `named` gives the
    tokenizer attributes (`image_token`, ...) that some processors read."""
    byte_vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", extra_special_tokens=named)


def _ids(tok: PreTrainedTokenizerFast, **tokens: str) -> dict[str, int]:
    return {field: tok.convert_tokens_to_ids(token) for field, token in tokens.items()}


def _text(tok: PreTrainedTokenizerFast, **more: object) -> dict:
    """The language model's config: every id of the tokenizer has an embedding row (rounded up
    to a multiple of 8, as real checkpoints pad them)."""
    return dict(TEXT, vocab_size=-(-len(tok) // 8) * 8, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None, **more)


# --- LLaVA and LLaVA-NeXT: CLIP vision, a two-layer projector, Llama ---------------------------

# LLaVA-NeXT tiles an image by the best of these resolutions and adds the whole image resized.
PINPOINTS = [[PIXELS, PIXELS], [PIXELS, 2 * PIXELS], [2 * PIXELS, PIXELS]]


def _llava_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return transformers.LlavaConfig(
        vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=32),
        text_config=_text(tok, model_type="llama"),
        image_seq_length=(PIXELS // VISION_PATCH) ** 2, **_ids(tok, image_token_index="<image>"))


def _llava_next_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return transformers.LlavaNextConfig(
        vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=32),
        text_config=_text(tok, model_type="llama"), image_grid_pinpoints=PINPOINTS,
        image_seq_length=(PIXELS // VISION_PATCH) ** 2, **_ids(tok, image_token_index="<image>"))


def _llava_processor(tok: PreTrainedTokenizerFast, template: str) -> ProcessorMixin:
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": PIXELS},
                                                crop_size={"height": PIXELS, "width": PIXELS})
    # CLIP adds a CLS token, which the default feature strategy drops: one token a patch
    return transformers.LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=VISION_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)


def _llava_next_processor(tok: PreTrainedTokenizerFast, template: str) -> ProcessorMixin:
    images = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": PIXELS}, crop_size={"height": PIXELS, "width": PIXELS},
        image_grid_pinpoints=PINPOINTS)
    return transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=tok, patch_size=VISION_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)


# --- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: a patch ViT with its merger, a Qwen LM with M-RoPE --------

def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


def _qwen_text(tok: PreTrainedTokenizerFast, **more: object) -> dict:
    # head_dim 8 has 4 rotary frequencies: M-RoPE gives 2 to time, 1 to height, 1 to width
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return _text(tok, rope_parameters=rope, **more)


def _qwen_vision(**more: object) -> dict:
    return dict(depth=2, num_heads=4, patch_size=QWEN_PATCH, spatial_merge_size=2,
                temporal_patch_size=2, **more)


def _qwen2_vl_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    vision = _qwen_vision(embed_dim=32, mlp_ratio=2, hidden_size=TEXT["hidden_size"])
    return transformers.Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision,
                                      **_qwen_ids(tok))


def _qwen2_5_vl_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    # block 0 attends within windows of 2x2 merged tokens, block 1 over the whole image
    vision = _qwen_vision(hidden_size=32, intermediate_size=37,
                          out_hidden_size=TEXT["hidden_size"], window_size=4 * QWEN_PATCH,
                          fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=vision,
                                         **_qwen_ids(tok))


def _qwen3_vl_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    # deepstack: block 0's features also enter the language model's first layers
    vision = _qwen_vision(hidden_size=32, intermediate_size=37,
                          out_hidden_size=TEXT["hidden_size"],
                          num_position_embeddings=(PIXELS // QWEN_PATCH) ** 2,
                          deepstack_visual_indexes=[0])
    return transformers.Qwen3VLConfig(text_config=_qwen_text(tok, head_dim=8),
                                      vision_config=vision, **_qwen_ids(tok))


def _qwen_images(mean: list[float] | None = None) -> BaseImageProcessor:
    """Images of 8x8 to 32x32 pixels (resized to multiples of 8): 1 to 16 image tokens."""
    side = 2 * QWEN_PATCH
    more = {} if mean is None else {"image_mean": mean, "image_std": mean}
    return transformers.Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": side * side, "longest_edge": PIXELS * PIXELS}, **more)


def _qwen_processor(name: str, videos: str, mean: list[float] | None = None,
                    ) -> Callable[[PreTrainedTokenizerFast, str], ProcessorMixin]:
    """The family's own processor `name` (with the video processor `videos`) where torchvision
    is installed, else PaddleOCR-VL's (see the module's docstring)."""

    def build_processor(tok: PreTrainedTokenizerFast, template: str) -> ProcessorMixin:
        if not is_torchvision_available():
            return transformers.PaddleOCRVLProcessor(image_processor=_qwen_images(mean),
                                                     tokenizer=tok, chat_template=template)
        video = getattr(transformers, videos)(patch_size=QWEN_PATCH, merge_size=2,
                                              temporal_patch_size=2)
        return getattr(transformers, name)(image_processor=_qwen_images(mean), tokenizer=tok,
                                           video_processor=video, chat_template=template)

    return build_processor


# --- Idefics3 and SmolVLM: SigLIP, a pixel-shuffle connector, Llama ----------------------------

# 4x4 patches; the connector's pixel shuffle (scale 2) makes them 4 image tokens.
IDEFICS_SEQ = (PIXELS // VISION_PATCH) ** 2 // 4


def _idefics3_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return transformers.Idefics3Config(
        vision_config=VISION, text_config=_text(tok, model_type="llama"), scale_factor=2,
        pad_token_id=tok.pad_token_id, **_ids(tok, image_token_id="<image>"))


def _smolvlm_config(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return transformers.SmolVLMConfig(
        vision_config=VISION, text_config=_text(tok, model_type="llama"), scale_factor=2,
        pad_token_id=tok.pad_token_id, **_ids(tok, image_token_id="<image>"))


def _idefics3_processor(tok: PreTrainedTokenizerFast, template: str) -> ProcessorMixin:
    """One 32x32 tile an image: no splitting, so no row/column tokens."""
    images = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": PIXELS}, max_image_size={"longest_edge": PIXELS},
        do_image_splitting=False)
    return transformers.Idefics3Processor(image_processor=images, tokenizer=tok,
                                          image_seq_len=IDEFICS_SEQ, chat_template=template)


@dataclass(frozen=True)
class Family:
    """How one family is built: its special tokens (and the named ones processors read), the
    text its chat template puts for an image entry, and its config and processor."""

    specials: tuple[str, ...]
    named: dict[str, str]
    image_text: str
    config: Callable[[PreTrainedTokenizerFast], PretrainedConfig]
    processor: Callable[[PreTrainedTokenizerFast, str], ProcessorMixin]


LLAVA = ((*CHATML, "<image>"), {"image_token": "<image>"}, "<image>")
QWEN = ((*CHATML, *QWEN_TOKENS), QWEN_NAMED, "<|vision_start|><|image_pad|><|vision_end|>")
IDEFICS = ((*CHATML, *IDEFICS_TOKENS), {}, "<image>")
BUILDERS: dict[str, Family] = {
    "llava": Family(*LLAVA, _llava_config, _llava_processor),
    "llava_next": Family(*LLAVA, _llava_next_config, _llava_next_processor),
    "qwen2_vl": Family(*QWEN, _qwen2_vl_config,
                       _qwen_processor("Qwen2VLProcessor", "Qwen2VLVideoProcessor")),
    "qwen2_5_vl": Family(*QWEN, _qwen2_5_vl_config,
                         _qwen_processor("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor")),
    "qwen3_vl": Family(*QWEN, _qwen3_vl_config,
                       _qwen_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", [0.5] * 3)),
    "idefics3": Family(*IDEFICS, _idefics3_config, _idefics3_processor),
    "smolvlm": Family(*IDEFICS, _smolvlm_config, _idefics3_processor),
}
FAMILIES: tuple[str, ...] = tuple(BUILDERS)


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model of the family and its processor into folder; return folder."""
    spec = BUILDERS[family]
    tok = tokenizer(spec.specials, spec.named)
    processor = spec.processor(tok, chat_template(spec.image_text))
    config = spec.config(tok)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


SHAPES = ("circle", "square", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
QUESTIONS = ("What is this?", "Describe the picture.", "What shape do you see?")


def picture(shape: str, colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """A coloured shape at a random place and size on a light background: a picture whose
    answer a model can learn."""
    image = Image.new("RGB", (PIXELS, PIXELS), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    x, y, r = rng.randint(10, 21), rng.randint(10, 21), rng.randint(5, 9)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.rectangle((x - 2, y - r, x + 2, y + r), fill=colour)
        draw.rectangle((x - r, y - 2, x + r, y + 2), fill=colour)
    return image


def records(n: int, seed: int = 0) -> list[dict]:
    """n rows in TRL's format: {"images": [PIL RGB image], "messages": [user turn with an image
    entry and a question, assistant turn with a short answer]}, deterministic."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shape, colour, question = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(
            QUESTIONS)
        rows.append({
            "images": [picture(shape, COLOURS[colour], rng)],
            "messages": [
                {"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant",
                 "content": [{"type": "text", "text": f"A {colour} {shape}."}]},
            ],
        })
    return rows
