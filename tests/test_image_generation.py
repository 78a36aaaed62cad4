"""task.kind image_generation through the CLI: LoRA on a tiny random Stable Diffusion pipeline's
UNet (a pipeline folder written here) over captioned images runs (fused), resumes, reports,
exports a PEFT adapter that reproduces the UNet's outputs, and suggests; a fused group trains
each trial as alone; images and captions become the denoiser's inputs once, seeded; bad images
are one line naming the file, exit 2. PEFT equivalence on the UNet is in
test_peft_equivalence.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorasweep.cli import main
from lorasweep.config import ModelSpec, load_study, validate_study
from lorasweep.errors import StudyError
from lorasweep.models import load_model, load_preprocessor
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks import build_task
from lorasweep.train import train_group

from .conftest import (
    assert_lora_trial_exports,
    assert_study_lifecycle,
    read_rows,
    refused,
    write_study,
)
from .diffusion_parts import tiny_pipeline

# The diffusion demo: the best LR of each method on its grid, and the validation loss before
# training (README, "Image generation")
DEMO_LRS = {"lora": 1e-2, "full": 1e-3}
DEMO_START = 0.1215
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def write_images(folder: Path, per_colour: int, seed: int) -> Path:
    """An image folder of noisy colour fields of several sizes, captioned by their colour in
    its metadata.jsonl (the `text` column, as diffusers' examples lay a caption set out)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, colour in COLOURS.items():
        for i in range(per_colour):
            size = (20 + 4 * i, 16 + 2 * i)
            pixels = np.clip(rng.normal(colour, 40, (size[1], size[0], 3)), 0, 255)
            file = f"{name}-{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(folder / file)
            rows.append({"file_name": file, "text": f"a {name} square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return captioned_images(tmp_path_factory.mktemp("captions") / "data")


def captioned_images(root: Path) -> Path:
    """Five captioned training images per colour and one test image each."""
    write_images(root / "train", 5, 0)
    write_images(root / "test", 1, 1)
    return root


def generation_study(pipeline: Path, data: Path, **task) -> dict:
    return {"name": "diffusion", "seed": 0, "model": {"source": str(pipeline)},
            "task": {"kind": "image_generation", "dataset": str(data), "prompt_field": "text",
                     "validation_size": 4, **task},
            "train": {"steps": 3, "batch_size": 4, "eval_batch_size": 8},
            "search": {"methods": ["lora", "full"], "ranks": [2], "lora_alpha": ["2r"],
                       "target_modules": ["to_q,to_k,to_v,to_out.0"],
                       "lr": [1e-3, 1e-2], "seeds": [0]}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pipeline, image_data) -> Path:
    root = tmp_path_factory.mktemp("generation-study")
    path = write_study(root / "study.yaml", generation_study(pipeline, image_data))
    # K=2: LoRA's two LRs train fused, K copies of the noised latents end to end
    assert main(["run", str(path), "--out", str(root / "study"), "--max-group", "2"]) == 0
    return root / "study"


def test_a_study_runs_resumes_reports_and_suggests(finished, capsys):
    rows = assert_study_lifecycle(finished, capsys, "eval_loss")
    assert all(float(r["metric"]) > 0 for r in rows)


def test_export_loads_in_peft_over_the_unet_and_reproduces_it(finished, tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn((2, 4, 8, 8), generator=generator),
              "timestep": torch.tensor([3, 70]),
              "encoder_hidden_states": torch.randn((2, 5, 16), generator=generator)}
    assert_lora_trial_exports(finished, tmp_path / "adapter", "image_generation", None, inputs)


def build(study: dict):
    loaded = validate_study(study, "s")
    return build_task(loaded, load_preprocessor(loaded.model, "image_generation"))


def test_inputs_are_encoded_once_and_seeded(pipeline, image_data):
    """A split holds what the UNet takes (8x8 latents of the 16x16 images, a timestep, the
    caption's embedding), not pixels; two builds draw the same noise and timesteps; one colour's
    captions embed alike; the target is the noise (the schedule predicts epsilon)."""
    study = generation_study(pipeline, image_data)
    first, second = build(study), build(study)
    inputs = first.train.inputs
    assert set(inputs) == {"sample", "timestep", "encoder_hidden_states"}
    assert inputs["sample"].shape == (11, 4, 8, 8) and first.train.labels.shape == (11, 4, 8, 8)
    assert inputs["encoder_hidden_states"].shape == (11, 12, 16)
    assert len(first.validation) == 4 and len(first.test) == 3
    for ours, again in ((first.train, second.train), (first.validation, second.validation)):
        assert torch.equal(ours.labels, again.labels)
        assert all(torch.equal(t, again.inputs[n]) for n, t in ours.inputs.items())
    assert not torch.equal(first.train.labels[:4], first.validation.labels)
    states = inputs["encoder_hidden_states"]
    assert len({tuple(s.flatten().tolist()) for s in states}) == 3  # three captions
    unconditional = build({**study, "task": {**study["task"], "prompt_field": None}})
    assert torch.equal(unconditional.train.labels, first.train.labels)
    empty = unconditional.train.inputs["encoder_hidden_states"]
    assert torch.equal(empty, empty[:1].expand_as(empty))  # the empty prompt, for every image


@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_a_fused_group_trains_each_trial_as_alone(pipeline, image_data, tmp_path, lora_dropout):
    """Two LRs trained in one forward and backward over the UNet get the metrics each gets
    trained alone (convolutions and attention see K copies of the batch; with lora_dropout,
    the trials share one mask, as they would alone)."""
    study = generation_study(pipeline, image_data)
    study["train"]["lora_dropout"] = lora_dropout
    assert_fused_trains_as_alone(study, tmp_path)


def assert_fused_trains_as_alone(study: dict, tmp_path: Path) -> None:
    """Two LoRA LRs trained as one group get the validation and test metrics each gets alone."""
    study = load_study(write_study(tmp_path / "s.yaml", study))
    task = build_task(study, load_preprocessor(study.model, "image_generation"))
    base = load_model(study.model, "image_generation", None, None)
    cell = Cell(method="lora", rank=2, lora_alpha="4", init="kaiming",
                target_modules="all-linear")
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate([1e-3, 3e-2])]
    cpu = torch.device("cpu")
    fused = train_group(base, task, study.train, trials, cpu)
    assert fused[0].metrics["eval_loss"] != fused[1].metrics["eval_loss"]
    for trial, together in zip(trials, fused, strict=True):
        alone = train_group(base, task, study.train, [trial], cpu)[0]
        assert together.status == alone.status == "complete"
        assert together.metrics == pytest.approx(alone.metrics, rel=1e-5)
        assert together.test == pytest.approx(alone.test, rel=1e-5)


def test_an_unreadable_image_is_named(pipeline, image_data, tmp_path, capsys):
    data = Path(shutil.copytree(image_data, tmp_path / "data"))
    (data / "train" / "red-0.png").write_bytes(b"not a png")
    err = refused(tmp_path, generation_study(pipeline, data), capsys)
    assert "task.image_field:" in err and "red-0.png" in err
    assert "cannot be read as an image" in err


def test_a_missing_caption_column_is_named(pipeline, image_data, tmp_path, capsys):
    study = generation_study(pipeline, image_data, prompt_field="caption")
    err = refused(tmp_path, study, capsys)
    assert "task.prompt_field:" in err
    assert "no field 'caption'" in err


def test_what_does_not_apply_is_refused_in_one_line(pipeline, image_data, tmp_path):
    """Text fields, a 4-bit base, and a UNet where a pipeline names its transformer (SD3's
    and Flux's folder; tests/test_image_generation_families.py has the other layouts)."""
    study = generation_study(pipeline, image_data)
    with pytest.raises(StudyError, match=r"task\.response_field: for text kinds"):
        validate_study({**study, "task": {**study["task"], "response_field": "x"}}, "s")
    with pytest.raises(StudyError, match=r"model\.quantize: nf4"):
        load_model(ModelSpec(source=str(pipeline), quantize="nf4"), "image_generation", None,
                   None)
    other = Path(shutil.copytree(pipeline, tmp_path / "dit"))
    index = json.loads((other / "model_index.json").read_text())
    index["transformer"] = index.pop("unet")
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(StudyError, match=r"^model\.source: .*names a UNet2DConditionModel "
                                         "denoiser in transformer/"):
        load_model(ModelSpec(source=str(other)), "image_generation", None, None)


def test_curvature_measures_the_unet(finished, tmp_path):
    out = tmp_path / "curvature"
    assert main(["curvature", str(finished), "--method", "lora", "--batches", "1",
                 "--blocks", "joint", "--max-iter", "8", "--out", str(out)]) == 0
    rows = (out / "curvature.csv").read_text().splitlines()
    assert len(rows) == 2 and "joint" in rows[1]


def test_the_diffusion_demo_runs_cut_down(tmp_path):
    """`lorasweep run diffusion`, each method at its grid's best LR (README, "Image
    generation"), 15 steps: the packaged pipeline loads offline and both methods lower the
    pretrained UNet's denoising loss on digits 5-9 (DEMO_START, its loss before training)."""
    out = tmp_path / "diffusion"
    assert main(["run", "diffusion", "--out", str(out), "--threads", "1",
                 "--set", "train.steps=15", "--set",
                 f"search.methods=[{{name: lora, lr: [{DEMO_LRS['lora']}]}}, "
                 f"{{name: full, lr: [{DEMO_LRS['full']}]}}]"]) == 0
    rows = read_rows(out)
    assert [r["method"] for r in rows] == ["lora", "full"]
    assert all(r["status"] == "complete" and float(r["eval_loss"]) < DEMO_START
               for r in rows), rows
