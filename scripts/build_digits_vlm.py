"""Compose and align the image-text demo's base model "digits-vlm": a LLaVA of digits-vit and
SmolLM2.

Why
---
An image-text sweep needs a base that already answers about images, so that LoRA adapts it
rather than teaching it to see; no such model ships offline, and a real one is far too slow for
a CPU demo. Two models that do ship make one: digits-vit's ViT (8x8 pixels, 16 patches,
pretrained on digits 0-4) as the vision tower and SmolLM2-135M-Instruct as the language model,
joined by LLaVA's projector (linear, GELU, linear: 64 -> 576 -> 576). The projector is the only
new part, trained here as in LLaVA's first stage ("feature alignment"): the ViT and the language
model frozen, on digits 0-4 asked as a chat ("Which digit is this?", answered with the digit's
English word). The demo (``lorasweep run vlm``) then tunes the model to a reply it has never
given: the numeral (``builtin:digits-vqa-0-4``, ``scripts/build_digits_vqa.py``). Digits 5-9,
which neither the ViT nor the projector has seen, are too slow to learn for a CPU demo: LoRA
reaches about 0.3-0.4 accuracy on them in 30 steps of 8 (README).

How
---
1. Write the shipped parts to OUT (``src/lorasweep/data/digits_vlm``): the LLaVA config
   (``vit_msn`` vision config: ViTModel's layers without its pooler, whose output LLaVA never
   reads; the last layer's hidden states after the final layer norm; all 16 patch tokens, the
   CLS token dropped), the processor (digits-vit's image processor, converting greyscale to
   RGB; SmolLM2's tokenizer, with IMAGE_TOKEN, an existing special token that chat never uses,
   standing for each of the 16 image positions, so no embedding is added) and its ChatML chat
   template (no default system prompt), and a freshly drawn projector.
2. Compose the full model from them (``packaged_models.compose_digits_vlm``) in a temporary
   folder and load it.
3. Train the projector alone, with one torch thread and a fixed seed: AdamW at LR, STEPS steps
   of BATCH conversations drawn with replacement from the training split of the built-in
   digits 0-4 (``data/digits/0-4``), each image asked QUESTION and answered with its word
   (WORDS), WARMUP steps of linear warmup then cosine decay; the loss is on the assistant's
   tokens only (the word and ``<|im_end|>``).
4. Save the projector, and print the composed model's greedy answer accuracy (its reply is
   exactly the word) on the test splits of digits 0-4 and 5-9.

Usage::

    python scripts/build_digits_vlm.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    ViTConfig,
    ViTImageProcessorPil,
    ViTMSNConfig,
)

from lorasweep.packaged_models import (
    DIGITS_VIT_DIR,
    DIGITS_VLM_DIR,
    DIGITS_VLM_PROJECTOR,
    compose_digits_vlm,
    packaged_model_path,
)

SEED = 0
STEPS = 150
BATCH = 16
LR = 1e-3
WARMUP = 20
IMAGE_TOKEN = "<empty_output>"  # id 16: a Jupyter-notebook marker of SmolLM2's tokenizer
DIGITS_DIR = Path(__file__).resolve().parent.parent / "src" / "lorasweep" / "data" / "digits"
QUESTION = "Which digit is this?"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# ViTConfig's fields that the vision tower keeps (ViTMSNConfig has no pooler or classifier).
VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "initializer_range", "layer_norm_eps", "image_size", "patch_size",
                 "num_channels", "qkv_bias")
# ChatML as SmolLM2 writes it, but with no default system prompt; a turn's content is a string or
# a list of {"type": "image"} and {"type": "text", "text": ...} entries (TRL's format).
CHAT_TEMPLATE = """\
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\\n' -}}
  {%- if message['content'] is string -%}
    {{- message['content'] -}}
  {%- else -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}
        {{- 'IMAGE_TOKEN' -}}
      {%- elif part['type'] == 'text' -%}
        {{- part['text'] -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
""".replace("IMAGE_TOKEN", IMAGE_TOKEN)


def write_parts(out: Path, smollm2: Path) -> None:
    """Write the config, the processor and a freshly drawn projector into `out`."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vit = ViTConfig.from_pretrained(DIGITS_VIT_DIR)
    vision = ViTMSNConfig(**{name: getattr(vit, name) for name in VISION_FIELDS},
                          tie_last_hidden_states=True)  # hidden_states[-1]: after the layer norm
    text = AutoConfig.from_pretrained(smollm2)
    patches = (vit.image_size // vit.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=patches, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         architectures=["LlavaForConditionalGeneration"])
    config.save_pretrained(out)
    _clean_json(out / "config.json", ("_name_or_path", "_model_name_or_path"))

    image_processor = ViTImageProcessorPil.from_pretrained(DIGITS_VIT_DIR, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vit.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,  # the CLS token, then dropped
                               chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    with tempfile.TemporaryDirectory() as folder:  # only the small files ship, not tokenizer.json
        processor.save_pretrained(folder)
        for name in ("processor_config.json", "chat_template.jinja", "tokenizer_config.json"):
            (out / name).write_bytes((Path(folder) / name).read_bytes())
    _clean_json(out / "tokenizer_config.json", ("is_local", "local_files_only"))

    torch.manual_seed(SEED)
    first = torch.nn.Linear(vit.hidden_size, text.hidden_size)
    second = torch.nn.Linear(text.hidden_size, text.hidden_size)
    save_projector(out, {"linear_1": first, "linear_2": second})


def _clean_json(path: Path, keys: tuple[str, ...]) -> None:
    """Drop fields that name this machine's paths from a saved JSON file, at any depth."""
    def clean(value: object) -> object:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in keys}
        return value
    path.write_text(json.dumps(clean(json.loads(path.read_text())), indent=2, sort_keys=True)
                    + "\n")


def save_projector(out: Path, layers: dict[str, torch.nn.Module]) -> None:
    """The projector's weights, under the names the composed model gives them."""
    save_file({f"{name}.{key}": value.detach().contiguous()
               for name, layer in layers.items() for key, value in layer.state_dict().items()},
              out / DIGITS_VLM_PROJECTOR, metadata={"format": "pt"})


def conversations(processor: ProcessorMixin, half: str, split: str) -> dict[str, torch.Tensor]:
    """One split of the built-in digits `half`, asked QUESTION, as model inputs, and which
    tokens are the reply's.

    Every conversation has the same length (16 image tokens, a one-token word), so no padding.
    """
    rows = pq.read_table(DIGITS_DIR / half / f"{split}.parquet").to_pylist()
    images = [[Image.open(io.BytesIO(row["image"]["bytes"]))] for row in rows]
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
              {"role": "assistant", "content": [{"type": "text",
                                                 "text": WORDS[int(row["label"])]}]}]
             for row in rows]
    texts = [processor.apply_chat_template(chat, tokenize=False) for chat in chats]
    prompts = [processor.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
               for chat in chats]
    batch = processor(images=images, text=texts, return_tensors="pt")
    prompt_ids = processor(images=images, text=prompts, return_tensors="pt")["input_ids"]
    ids = batch["input_ids"]
    if not bool(batch["attention_mask"].all()) or prompt_ids.shape[1] != ids.shape[1] - 3:
        raise ValueError("expected conversations of one length, each reply one word")
    # The reply's tokens: the word and <|im_end|>, not the "\n" that the template puts after it.
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, prompt_ids.shape[1]:-1] = True
    return {"input_ids": ids, "pixel_values": batch["pixel_values"], "answer": answer}


def reply_logits(model: PreTrainedModel, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits that predict each reply token (the reply is at the same place in every row)."""
    start = int(data["answer"][0].nonzero()[0])
    keep = data["input_ids"].shape[1] - start + 1  # from the position before the reply on
    logits = model(input_ids=data["input_ids"], pixel_values=data["pixel_values"],
                   logits_to_keep=keep).logits
    return logits[:, : int(data["answer"][0].sum())]


def answer_accuracy(model: PreTrainedModel, data: dict[str, torch.Tensor],
                    batch: int = 60) -> float:
    """The share of rows whose greedy reply is exactly the word: every reply token the argmax.

    A one-word reply is right under greedy decoding exactly when each of its tokens is the
    argmax given the ones before, so one teacher-forced forward decides it.
    """
    right = 0
    with torch.no_grad():
        for start in range(0, len(data["input_ids"]), batch):
            part = {key: value[start:start + batch] for key, value in data.items()}
            predicted = reply_logits(model, part).argmax(-1)
            right += int((predicted == part["input_ids"][part["answer"]].view(
                predicted.shape)).all(-1).sum())
    return right / len(data["input_ids"])


def align(model: PreTrainedModel, data: dict[str, torch.Tensor]) -> None:
    """Train the projector alone (LLaVA's stage 1): the ViT and the language model frozen."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / WARMUP, 0.5 * (1 + math.cos(math.pi * step / STEPS))))
    generator = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        index = torch.randint(len(data["input_ids"]), (BATCH,), generator=generator)
        part = {key: value[index] for key, value in data.items()}
        logits = reply_logits(model, part)
        targets = part["input_ids"][part["answer"]].view(logits.shape[:2])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: training loss {loss.item():.4f}", flush=True)


def build(out: Path) -> None:
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    smollm2 = packaged_model_path("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    write_parts(out, smollm2)
    with tempfile.TemporaryDirectory() as folder:
        compose_digits_vlm(Path(folder), smollm2, out)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    model.eval()  # no dropout anywhere; the frozen parts stay as they are
    align(model, conversations(processor, "0-4", "train"))
    projector = model.model.multi_modal_projector
    save_projector(out, {"linear_1": projector.linear_1, "linear_2": projector.linear_2})
    for half in ("0-4", "5-9"):
        accuracy = answer_accuracy(model, conversations(processor, half, "test"))
        print(f"greedy answer accuracy, digits {half} test: {accuracy:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DIGITS_VLM_DIR,
                        help=f"where the shipped parts go (default {DIGITS_VLM_DIR})")
    build(parser.parse_args().out)
