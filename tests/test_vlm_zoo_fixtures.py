"""The tiny vision-language models of tests/vlm_zoo.py are what the image-text tests assume:
each loads offline through the Auto classes, its chat template renders TRL's messages with the
prefix property, and its processor's output runs a forward, also in batches and for text-only
rows. (conftest.py sets HF_HUB_OFFLINE=1: nothing here reaches the Hub.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .vlm_zoo import FAMILIES, build, records

# The inputs beside input_ids, attention_mask and pixel_values that each family's forward needs.
EXTRAS = {
    "llava": set(),
    "llava_next": {"image_sizes"},
    "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen3_vl": {"image_grid_thw", "mm_token_type_ids"},
    "idefics3": {"pixel_attention_mask"},
    "smolvlm": {"pixel_attention_mask"},
}
# Image tokens one 32x32 picture becomes: LLaVA-NeXT adds a tile and a newline token a row,
# Idefics3's pixel shuffle merges 2x2 patches.
IMAGE_TOKENS = {"llava": 16, "llava_next": 36, "qwen2_vl": 16, "qwen2_5_vl": 16, "qwen3_vl": 16,
                "idefics3": 4, "smolvlm": 4}
TEXT_ONLY = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Say hi, 3 times!\n\tcafé ~ {ok}"},
             {"role": "assistant", "content": "Hi hi hi."}]


def test_every_family_is_described() -> None:
    assert set(FAMILIES) == set(EXTRAS) == set(IMAGE_TOKENS)


def image_token_id(config: object) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


def assert_prefixes(processor: object, messages: list[dict]) -> None:
    """Each first i turns, rendered to be answered where the assistant speaks next, begin the
    whole conversation's rendering."""
    whole = processor.apply_chat_template(messages, tokenize=False)
    for i in range(1, len(messages)):
        answer_next = messages[i]["role"] == "assistant"
        head = processor.apply_chat_template(messages[:i], tokenize=False,
                                             add_generation_prompt=answer_next)
        assert whole.startswith(head), (head, whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_renders_and_runs(family: str, tmp_path: Path) -> None:
    folder = build(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.model_type == family
    assert next(model.parameters()).dtype == torch.float32
    vocab = model.config.get_text_config().vocab_size
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id is not None and len(tokenizer) <= vocab
    text = TEXT_ONLY[1]["content"]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    rows = records(2)
    for messages in [row["messages"] for row in rows] + [TEXT_ONLY]:
        assert_prefixes(processor, messages)
    texts = [processor.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    images = [row["images"][0] for row in rows]
    expected = {"input_ids", "attention_mask", "pixel_values"} | EXTRAS[family]

    one = processor(text=texts[:1], images=images[:1], return_tensors="pt")
    assert set(one) == expected
    assert int((one["input_ids"] == image_token_id(model.config)).sum()) == IMAGE_TOKENS[family]
    with torch.no_grad():
        assert model(**one).logits.shape == (1, one["input_ids"].shape[1], vocab)
        two = processor(text=texts, images=images, return_tensors="pt", padding=True)
        assert model(**two).logits.shape == (2, two["input_ids"].shape[1], vocab)
        # an image row beside a text-only row, then text alone
        plain = processor.apply_chat_template(TEXT_ONLY, tokenize=False)
        mixed = processor(text=[texts[0], plain], images=images[:1], return_tensors="pt",
                          padding=True)
        assert model(**mixed).logits.shape == (2, mixed["input_ids"].shape[1], vocab)
        alone = processor(text=[plain], return_tensors="pt")
        assert model(**alone).logits.shape == (1, alone["input_ids"].shape[1], vocab)


def test_a_build_and_the_records_are_the_same_for_a_seed(tmp_path: Path) -> None:
    weights = [AutoModelForImageTextToText.from_pretrained(build("llava", tmp_path / name, seed))
               .state_dict() for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])
    first, again = records(4, seed=1), records(4, seed=1)
    assert [row["messages"] for row in first] == [row["messages"] for row in again]
    assert [row["images"][0].tobytes() for row in first] == [
        row["images"][0].tobytes() for row in again]
    assert all(row["images"][0].mode == "RGB" for row in first)
