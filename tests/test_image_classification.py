"""task.kind image_classification through the CLI: a tiny ViT on an image folder written here
(one sub-folder per class) runs (fused), resumes, reports, exports a PEFT adapter that
reproduces its outputs, suggests, and measures curvature; each kind of bad image is one line
naming its file, exit 2, before anything is recorded. PEFT equivalence on ViT and ConvNeXt is in
test_peft_equivalence.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessorPil

from lorasweep.cli import main
from lorasweep.config import ModelSpec, validate_study
from lorasweep.models import load_model, load_preprocessor
from lorasweep.tasks import build_task

from .conftest import (
    assert_lora_trial_exports,
    assert_study_lifecycle,
    read_rows,
    refused,
    write_study,
)

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def write_images(folder: Path, per_class: int, seed: int, size: tuple[int, int] = (40, 30)
                 ) -> Path:
    """PNG files of noisy colour fields, one sub-folder per colour: learnable in a few steps.
    One image of the first class is grayscale (converted to RGB on reading)."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 40, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")
    Image.new("L", size, 120).save(folder / "blue" / "gray.png")
    return folder


def image_study(data: Path, **task) -> dict:
    return {"name": "images", "seed": 0, "model": {"source": "tiny:vit"},
            "task": {"kind": "image_classification", "dataset": str(data),
                     "validation_size": 9, **task},
            "train": {"steps": 4, "batch_size": 6, "eval_batch_size": 16},
            "search": {"methods": ["lora", "full"], "ranks": [4], "lora_alpha": ["2r"],
                       "lr": [1e-3, 1e-2], "seeds": [0]}}


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "data"
    write_images(root / "train", 8, 0)
    write_images(root / "test", 2, 1, size=(24, 36))
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory, image_data) -> Path:
    root = tmp_path_factory.mktemp("image-study")
    path = write_study(root / "study.yaml", image_study(image_data))
    # K=2: each method's two LRs train fused, K copies of the images end to end
    assert main(["run", str(path), "--out", str(root / "study"), "--max-group", "2"]) == 0
    return root / "study"


def test_a_study_runs_resumes_and_reports(finished, capsys):
    rows = assert_study_lifecycle(finished, capsys, "accuracy")
    assert all(0 <= float(r["metric"]) <= 1 for r in rows)


def test_export_loads_in_peft_and_reproduces_outputs(finished, tmp_path):
    pixels = torch.randn((4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert_lora_trial_exports(finished, tmp_path / "adapter", "image_classification", 3,
                              {"pixel_values": pixels})


def test_curvature_measures_the_image_model(finished, tmp_path):
    out = tmp_path / "curvature"
    assert main(["curvature", str(finished), "--method", "lora", "--batches", "1",
                 "--blocks", "joint", "--max-iter", "8", "--out", str(out)]) == 0
    rows = (out / "curvature.csv").read_text().splitlines()
    assert len(rows) == 2 and "joint" in rows[1]


def test_a_peft_init_that_looks_at_images_trains_convnext(image_data, tmp_path):
    """EVA's calibration batches are pixel values (every position counts, as PEFT's default
    hook takes them), on ConvNeXt's pointwise layers."""
    study = image_study(image_data)
    study["model"] = {"source": "tiny:convnext"}
    study["search"] = {"methods": [{"name": "peft", "label": "eva", "peft_config": "LoraConfig",
                                    "peft": {"init_lora_weights": "eva"}}],
                       "ranks": [2], "lora_alpha": ["2r"], "lr": [1e-3], "seeds": [0]}
    out = tmp_path / "out"
    assert main(["run", str(write_study(tmp_path / "study.yaml", study)), "--out",
                 str(out)]) == 0
    assert [r["status"] for r in read_rows(out)] == ["complete"]


def test_a_bf16_convnext_base_takes_the_pixels_in_bf16(image_data, tmp_path):
    """ConvNeXt's first convolution does not cast its input (ViT's does): a bf16 base trained
    in fp32 gets its pixel values in bf16."""
    study = image_study(image_data)
    study["model"] = {"source": "tiny:convnext", "dtype": "bf16"}
    study["search"] = {**study["search"], "methods": ["lora"], "lr": [1e-3]}
    out = tmp_path / "out"
    assert main(["run", str(write_study(tmp_path / "study.yaml", study)), "--out",
                 str(out)]) == 0
    assert [r["status"] for r in read_rows(out)] == ["complete"]


def model_folder(folder: Path, processor: ViTImageProcessorPil) -> Path:
    """tiny:vit saved as a local model folder with the given image processor."""
    spec = ModelSpec(source="tiny:vit")
    load_model(spec, "image_classification", 3, processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_an_unreadable_file_is_named(image_data, tmp_path, capsys):
    data = Path(shutil.copytree(image_data, tmp_path / "data"))
    (data / "train" / "red" / "broken.png").write_bytes(b"not a png")
    err = refused(tmp_path, image_study(data), capsys)
    assert "task.image_field:" in err and "red/broken.png" in err
    assert "cannot be read as an image" in err


def test_a_label_outside_the_training_classes_is_named(image_data, tmp_path, capsys):
    data = Path(shutil.copytree(image_data, tmp_path / "data"))
    (data / "test" / "purple").mkdir()
    Image.new("RGB", (30, 30), (128, 0, 128)).save(data / "test" / "purple" / "0.png")
    err = refused(tmp_path, image_study(data), capsys)
    assert "task.label_field:" in err and "purple/0.png" in err
    assert "which the training data lacks" in err


def test_a_size_the_model_cannot_take_is_one_line(image_data, tmp_path, capsys):
    """A processor that does not resize: images of two sizes are named by the first that
    differs; images of one size the model was not built for are refused with that size."""
    study = image_study(image_data)
    study["model"] = {"source": str(model_folder(tmp_path / "model",
                                                 ViTImageProcessorPil(do_resize=False)))}
    err = refused(tmp_path, study, capsys)
    assert "task.image_field:" in err and "does not resize to one size" in err
    data = write_images(tmp_path / "one-size", 4, 0, size=(48, 48))
    err = refused(tmp_path, {**study, "task": {**study["task"], "dataset": str(data)}}, capsys)
    assert "the model cannot take images of 48x48 pixels" in err


def test_grayscale_images_are_converted(image_data):
    """The folder's grayscale image trains as RGB (its pixel values have three channels)."""
    task = build(image_study(image_data))
    assert task.train.inputs["pixel_values"].shape[1:] == (3, 32, 32)
    assert len(task.train) + len(task.validation) == 3 * 8 + 1
    assert task.label_names == sorted(COLOURS)


@pytest.mark.parametrize("form", ["parquet", "saved"])
def test_image_datasets_as_parquet_or_saved_read_as_the_folder(image_data, tmp_path, form):
    """A Hugging Face dataset with an Image column and a ClassLabel, as a parquet file
    (task.train_file) or a folder from save_to_disk (task.dataset), gives the folder's task."""
    folder = datasets.load_dataset(str(image_data))["train"]
    study = image_study(image_data)
    if form == "parquet":
        folder.to_parquet(str(tmp_path / "train.parquet"))
        study["task"] = {**study["task"], "dataset": None,
                         "train_file": str(tmp_path / "train.parquet")}
    else:
        folder.save_to_disk(str(tmp_path / "saved"))
        study["task"] = {**study["task"], "dataset": str(tmp_path / "saved")}
    expected, task = build(image_study(image_data)), build(study)
    assert torch.equal(task.train.inputs["pixel_values"], expected.train.inputs["pixel_values"])
    assert torch.equal(task.train.labels, expected.train.labels)
    assert task.label_names == expected.label_names


def build(study: dict):
    """The task a study file builds (no model, no training)."""
    spec = validate_study(study, "s")
    return build_task(spec, load_preprocessor(spec.model, spec.task.kind))
