"""image_generation beyond Stable Diffusion 1.x/2.x: SDXL's UNet (two CLIP encoders, pooled
text and time ids) and SD3's MMDiT transformer (CLIP + T5 joint conditioning, the flow-matching
loss of diffusers' SD3 LoRA script), each from a tiny random pipeline folder written here. A
study runs fused, resumes, reports, exports a PEFT adapter that reproduces the denoiser and
has its curvature measured; a
fused group trains each trial as alone; the inputs are the family's, seeded; a layout the kind
does not train is one line read from model_index.json before anything loads. PEFT
equivalence on both denoisers is in test_peft_equivalence.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorasweep.cli import main
from lorasweep.config import ModelSpec, validate_study
from lorasweep.denoisers import FAMILIES, family_of
from lorasweep.errors import StudyError
from lorasweep.models import load_model, load_preprocessor
from lorasweep.tasks import build_task
from lorasweep.tasks.diffusion_text import FAMILY_TEXT

from .conftest import assert_lora_trial_exports, assert_study_lifecycle, refused, write_study
from .diffusion_parts import tiny_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
from .test_image_generation import assert_fused_trains_as_alone, captioned_images, generation_study

PIPELINES = {"sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return captioned_images(tmp_path_factory.mktemp("captions") / "data")


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline(request, tmp_path_factory) -> Path:
    return PIPELINES[request.param](tmp_path_factory.mktemp(request.param))


def build(study: dict):
    loaded = validate_study(study, "s")
    return build_task(loaded, load_preprocessor(loaded.model, "image_generation"))


def test_every_family_makes_its_conditioning():
    assert set(FAMILY_TEXT) == set(FAMILIES)


def test_a_study_runs_resumes_reports_exports_measures(pipeline, image_data, tmp_path, capsys):
    path = write_study(tmp_path / "study.yaml", generation_study(pipeline, image_data))
    folder = tmp_path / "study"
    assert main(["run", str(path), "--out", str(folder), "--max-group", "2"]) == 0
    rows = assert_study_lifecycle(folder, capsys, "eval_loss")
    assert all(float(r["metric"]) > 0 for r in rows)
    task = build(generation_study(pipeline, image_data))
    inputs = {name: t[:2] for name, t in task.validation.inputs.items()}
    assert_lora_trial_exports(folder, tmp_path / "adapter", "image_generation", None, inputs)
    # curvature: SD3's joint attention takes double backward on torch's math SDPA
    assert main(["curvature", str(folder), "--method", "lora", "--batches", "1",
                 "--blocks", "joint", "--max-iter", "8", "--out", str(tmp_path / "hvp")]) == 0
    assert "joint" in (tmp_path / "hvp" / "curvature.csv").read_text().splitlines()[1]


def test_sdxl_inputs_are_its_pipelines(image_data, tmp_path):
    """Both encoders' states side by side, the pooled text of each caption, and each image's
    time ids: its original (height, width), the crop's corner in the resized image, 16x16."""
    task = build(generation_study(tiny_sdxl_pipeline(tmp_path), image_data))
    inputs = task.train.inputs
    assert set(inputs) == {"sample", "timestep", "encoder_hidden_states", "text_embeds",
                           "time_ids"}
    assert inputs["encoder_hidden_states"].shape == (11, 12, 32)
    assert inputs["text_embeds"].shape == (11, 16)
    assert len({tuple(row.tolist()) for row in inputs["text_embeds"]}) == 3  # three captions
    # images (20 + 4i) x (16 + 2i): the height is the shorter side, resized to 16
    expected = set()
    for i in range(5):
        width, height = 20 + 4 * i, 16 + 2 * i
        resized = round(width * 16 / height)
        expected.add((height, width, 0, (resized - 16) // 2, 16, 16))
    ids = {tuple(int(v) for v in row) for row in inputs["time_ids"]}
    assert ids <= expected and len(ids) > 1


def test_sd3_inputs_and_loss_are_its_scripts(image_data, tmp_path):
    """Timesteps on the schedule at logit-normal draws, latents noised on the straight line,
    the T5 part zeros (no T5 in the pipeline), the same triples on every build; the loss is
    train_dreambooth_lora_sd3.py's: mean((-sigma * v + noised - latents)^2)."""
    study = generation_study(tiny_sd3_pipeline(tmp_path), image_data)
    first, second = build(study), build(study)
    parts = load_preprocessor(ModelSpec(source=str(tmp_path)), "image_generation")
    split = first.validation
    inputs = split.inputs
    assert set(inputs) == {"hidden_states", "timestep", "encoder_hidden_states",
                           "pooled_projections"}
    states = inputs["encoder_hidden_states"]
    assert states.shape == (4, 12 + 77, 32) and not states[:, 12:].any()
    assert inputs["pooled_projections"].shape == (4, 32)
    schedule = parts.scheduler.timesteps
    assert all(bool((schedule == t).any()) for t in inputs["timestep"])
    for ours, again in ((first.train, second.train), (first.validation, second.validation)):
        assert torch.equal(ours.labels, again.labels)
        assert all(torch.equal(t, again.inputs[n]) for n, t in ours.inputs.items())
    noised = inputs["hidden_states"]
    sigmas = (inputs["timestep"] / 1000).reshape(-1, 1, 1, 1)
    latents = split.labels[:, :-2].reshape(noised.shape) + noised
    assert torch.allclose(split.labels[:, -2], -sigmas.flatten())
    prediction = torch.randn(noised.shape, generator=torch.Generator().manual_seed(0))
    script = ((prediction * (-sigmas) + noised - latents) ** 2).reshape(4, -1).mean(1).mean()
    ours = first.trial_losses(prediction, split.labels, 1)
    assert ours.shape == (1,) and float(ours[0]) == pytest.approx(float(script), rel=1e-6)
    (metrics,) = first.summarize(*first.eval_terms(prediction, split.labels, 1)[:2],
                                 torch.zeros(1))
    assert metrics["eval_loss"] == pytest.approx(float(script), rel=1e-6)


def test_sd3_with_t5_puts_its_states_after_clips(image_data, tmp_path):
    """A pipeline that has T5: its 77 last hidden states follow the CLIP part on the sequence
    (the CLIP part zero-padded to T5's width, here equal), and they depend on the caption."""
    task = build(generation_study(tiny_sd3_pipeline(tmp_path, t5=True), image_data))
    states = task.train.inputs["encoder_hidden_states"]
    assert states.shape == (11, 12 + 77, 32)
    t5 = states[:, 12:]
    assert t5.any() and len({tuple(row.flatten().tolist()) for row in t5}) == 3


def test_a_fused_group_trains_each_trial_as_alone(pipeline, image_data, tmp_path):
    assert_fused_trains_as_alone(generation_study(pipeline, image_data), tmp_path)


def test_the_family_is_read_from_model_index_json():
    unet, clip = ["diffusers", "UNet2DConditionModel"], ["transformers", "CLIPTextModel"]
    assert family_of({"unet": unet, "text_encoder": clip}).name == "sd"
    assert family_of({"unet": unet, "text_encoder": clip, "text_encoder_2": clip}).name == "sdxl"
    assert family_of({"transformer": ["diffusers", "SD3Transformer2DModel"],
                      "text_encoder_3": [None, None]}).name == "sd3"
    with pytest.raises(ValueError, match="FluxTransformer2DModel denoiser in transformer/ "
                                         r"\(Flux\)"):
        family_of({"transformer": ["diffusers", "FluxTransformer2DModel"]})


def test_a_layout_it_does_not_train_is_one_line(image_data, tmp_path, capsys):
    """A Flux pipeline (its denoiser in transformer/) is named from model_index.json before any
    part loads, not as a UNet without config.json; an SDXL index over a plain UNet names what
    the UNet lacks."""
    flux = tiny_pipeline(tmp_path / "flux")
    index = json.loads((flux / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    del index["unet"]
    (flux / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "run").mkdir()
    capsys.readouterr()
    err = refused(tmp_path / "run", generation_study(flux, image_data), capsys)
    assert "error: model.source:" in err and "FluxTransformer2DModel" in err, err
    assert "config.json" not in err
    plain = Path(shutil.copytree(tmp_path / "flux", tmp_path / "plain"))
    shutil.rmtree(plain / "unet")
    tiny_pipeline(tmp_path / "sd")
    shutil.copytree(tmp_path / "sd" / "unet", plain / "unet")
    shutil.copytree(tmp_path / "sd" / "text_encoder", plain / "text_encoder_2")
    shutil.copytree(tmp_path / "sd" / "tokenizer", plain / "tokenizer_2")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    index["text_encoder_2"], index["tokenizer_2"] = index["text_encoder"], index["tokenizer"]
    (plain / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(StudyError, match=r"^model\.source: .*Stable Diffusion XL pipeline's is "
                                         "a UNet2DConditionModel with text_time conditioning"):
        load_model(ModelSpec(source=str(plain)), "image_generation", None, None)
