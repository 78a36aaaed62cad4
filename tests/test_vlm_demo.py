"""The offline vision-language demo (`lorasweep run vlm`): digits-vlm composes from what ships
(SmolLM2, digits-vit and the projector aligned here), its data rebuild from the digits, and a
cut-down run learns the reply the demo teaches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor

from lorasweep.cli import main
from lorasweep.packaged_models import compose_digits_vlm, packaged_model_path

from .conftest import read_rows
from .test_vision_demo import without_writer

ROOT = Path(__file__).resolve().parents[1]
VQA = ROOT / "src" / "lorasweep" / "data" / "digits_vqa"
FILES = [f"{half}/{split}.parquet" for half in ("0-4", "5-9") for split in ("train", "test")]


def test_the_data_rebuild_byte_for_byte_from_the_digits(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_digits_vqa.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for name in FILES:
        assert without_writer((tmp_path / name).read_bytes()) == without_writer(
            (VQA / name).read_bytes()), name


def test_digits_vlm_composes_into_a_llava_with_its_processor(tmp_path):
    """Every weight comes from a part (none missing, none drawn at random): the model the
    cache holds is the one composed again here."""
    folder = packaged_model_path("digits-vlm")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.chat_template and processor.image_token == "<empty_output>"
    again = tmp_path / "again"
    again.mkdir()
    compose_digits_vlm(again, packaged_model_path("smollm2"))
    assert (again / "model.safetensors").read_bytes() == (
        folder / "model.safetensors").read_bytes()


def test_the_vlm_demo_runs_cut_down(tmp_path):
    """LoRA on the language model only and on all three parts, each at its grid's best LR
    (docs/vision-language.md), 12 steps: both answer with the numeral far above chance (0.2)
    where the model, untuned, does so for 0.6% of the images."""
    out = tmp_path / "vlm"
    assert main(["run", "vlm", "--out", str(out), "--set",
                 "search.methods=[{name: lora, lr: [3.16228e-3]}]"]) == 0
    rows = read_rows(out)  # the metric column is the study's, task.metric: exact_match
    assert [r["target_modules"] for r in rows] == ["language", "language+projector+vision"]
    assert all(r["status"] == "complete" and float(r["metric"]) > 0.8 for r in rows), rows
