"""A study on a saved tiny GPT-2 folder (Conv1D layers, its own byte-level BPE tokenizer), run
through the command line, and its trials exported as PEFT adapters that reproduce them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from lorasweep.cli import main
from lorasweep.config import ModelSpec, validate_study
from lorasweep.errors import StudyError
from lorasweep.models import load_model, load_tokenizer
from lorasweep.workbench import load_workbench

from .conftest import (
    assert_export_reproduces,
    make_records,
    read_rows,
    tiny_study,
    trained_model,
    trial_spec,
    write_jsonl,
)

METHODS = ["lora", "dora", "pissa"]


def save_tiny_gpt2(folder: Path, texts: list[str]) -> Path:
    """A GPT-2 (hidden size 32, 2 blocks) with a byte-level BPE tokenizer trained on `texts`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_study(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    records = make_records(120, 0)
    data = {"train": write_jsonl(root / "train.jsonl", records),
            "test": write_jsonl(root / "test.jsonl", make_records(30, 1))}
    model = save_tiny_gpt2(root / "tiny-gpt2", [r["text"] for r in records])
    methods = [*METHODS, {"name": "peft", "label": "peft-own",
                          "peft": {"fan_in_fan_out": True, "target_modules": ["c_attn"]}}]
    study = tiny_study(data, model={"source": str(model)}, train={"steps": 6},
                       search={"methods": methods, "lr": [3e-3], "target_modules": "all-linear"})
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--out", str(root / "study")]) == 0
    return root / "study", model


def test_study_runs_every_method_on_gpt2(gpt2_study):
    folder, _ = gpt2_study
    rows = read_rows(folder)
    assert {r["method"] for r in rows} == {*METHODS, "peft-own"}
    assert all(r["status"] == "complete" for r in rows), rows
    params = {r["method"]: int(r["trainable_params"]) for r in rows}
    # LoRA at rank 4 on c_attn (32 -> 96), attn.c_proj (32 -> 32), c_fc (32 -> 128) and
    # mlp.c_proj (128 -> 32) of 2 blocks, plus the score head (32 x 3, no bias)
    lora = 2 * 4 * (128 + 64 + 160 + 160)
    assert params["lora"] == lora + 96
    assert params["dora"] == lora + 2 * (96 + 32 + 128 + 32) + 96
    assert params["peft-own"] == 2 * 4 * 128 + 96  # c_attn only, as the entry says


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_export_reproduces_outputs(gpt2_study, tmp_path: Path, method):
    folder, source = gpt2_study
    row = next(r for r in read_rows(folder) if r["method"] == method)
    out = tmp_path / "adapter"
    assert main(["export", str(folder), "--trial", row["trial"], str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    spec_model = ModelSpec(source=str(source))
    base = load_model(spec_model, "classification", 3, load_tokenizer(spec_model))
    ours = trained_model(folder, trial_spec(folder, int(row["trial"])), base)
    assert_export_reproduces(ours, base, out, (3, 250))


def test_curvature_measures_gpt2_conv1d_blocks(gpt2_study, tmp_path: Path):
    """One (A, B) block per adapted Conv1D, and its lambda_max is a finite number."""
    folder, _ = gpt2_study
    out = tmp_path / "curvature"
    assert main(["curvature", str(folder), "--method", "lora", "--batches", "1",
                 "--max-iter", "4", "--blocks", "modules", "--out", str(out)]) == 0
    with open(out / "curvature.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["block"] for r in rows] == [f"transformer.h.{i}.{name}" for i in range(2) for name in
                                          ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert {r["module_type"] for r in rows} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                "mlp.c_proj"}
    assert all(math.isfinite(float(r["lambda_max"])) for r in rows)
    assert all(int(r["params"]) == 4 * (sum(LAYER_SIZES[r["module_type"]])) for r in rows)


LAYER_SIZES = {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128),
               "mlp.c_proj": (128, 32)}


def test_workbench_leaves_a_peft_entrys_own_targets_to_peft(gpt2_study):
    """search.target_modules names no GPT-2 layer: only the entries that use it are refused."""
    folder, _ = gpt2_study
    raw = yaml.safe_load((folder.parent / "study.yaml").read_text())
    own = raw["search"]["methods"][-1]
    raw["search"] |= {"methods": [own], "target_modules": ["q_proj"]}
    assert load_workbench(validate_study(raw, "own")).base is not None
    raw["search"]["methods"] = ["lora", own]
    with pytest.raises(StudyError, match="'q_proj' matches no layer"):
        load_workbench(validate_study(raw, "own"))
