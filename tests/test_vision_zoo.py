"""Every image classifier transformers can build (tests/vision_zoo.py), trained as lorasweep
trains it: alone = fused = PEFT, or refused in one line that says why.

In train mode with the model's own dropout and drop path (`train.dropout: model`, the default)
and lora_dropout 0.2, LoRA's K = 1 and K = 2 trials match stock PEFT models (the head as
modules_to_save, norms included) in losses, step-0 gradients and 5 AdamW steps, each trial
against its own PEFT run (test_peft_equivalence.check_dropout_against_peft). A model lorasweep
refuses gets the one line its checks give (workbench.check_base, the task's check_model); one
refused only for its BatchNorm layers is exact with `train.dropout: off`, and is checked so.
docs/images.md's table and README.md's list are this file's verdicts (scripts/zoo_tables.py
writes them; test_the_docs_table_and_readme_list_are_these_verdicts fails where they part).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from lorasweep.config import TrainSpec
from lorasweep.errors import StudyError
from lorasweep.kinds import kind_of
from lorasweep.methods.targets import ADAPTABLE, resolve_targets
from lorasweep.tasks.base import Split
from lorasweep.tasks.image_classification import ImageClassificationTask
from lorasweep.workbench import check_base, check_fusable

from .test_peft_equivalence import check_dropout_against_peft
from .vision_zoo import (
    LABELS,
    PIXELS,
    TINY,
    classifiers,
    model_type_of,
    model_types,
    tiny_model,
)

pytestmark = pytest.mark.numerics

ROOT = Path(__file__).resolve().parents[1]
KIND = "image_classification"
EXACT = "exact"
EXACT_OFF = "exact with train.dropout: off"
EXACT_ALONE = "exact, one trial at a time"
EXACT_OFF_ALONE = "exact with train.dropout: off, one trial at a time"


@functools.cache
def verdict(class_name: str) -> tuple[str, str]:
    """(what lorasweep does with the classifier, the line that says why where it is not exact
    in train mode in fused groups)."""
    try:
        base = tiny_model(class_name)
    except ImportError as exc:  # transformers needs a package lorasweep does not install
        return "not built here", _needs(exc)
    refusal, alone = _checks(base, "model")
    if refusal is None:
        return (EXACT, "") if alone is None else (EXACT_ALONE, alone)
    if refusal.startswith("train.dropout: model:"):  # its norms: what does dropout off meet?
        other, alone = _checks(base, "off")
        if other is None:
            return (EXACT_OFF, refusal) if alone is None else (EXACT_OFF_ALONE,
                                                               f"{refusal}; {alone}")
        return "refused", other
    return "refused", refusal


# how each verdict is checked against PEFT: the dropout mode, and alone / in a fused pair
CHECKED = {EXACT: ("model", (1, 2)), EXACT_ALONE: ("model", (1,)),
           EXACT_OFF: ("off", (1, 2)), EXACT_OFF_ALONE: ("off", (1,))}


def _needs(exc: ImportError) -> str:
    names = re.findall(r"`pip install (\S+)`", str(exc)) or re.findall(r"(\w+) library", str(exc))
    return f"transformers needs {', '.join(sorted(set(names))) or 'a package not installed'}"


def _checks(base: torch.nn.Module, dropout: str) -> tuple[str | None, str | None]:
    """The line lorasweep refuses the base with, trained with `train.dropout: dropout`, and the
    line saying why its trials train one at a time (each None where it does not)."""
    pixels = torch.randn((2, 3, PIXELS, PIXELS), generator=torch.Generator().manual_seed(0))
    split = Split({"pixel_values": pixels}, torch.arange(2) % LABELS)
    task = ImageClassificationTask(split, split, None, [str(i) for i in range(LABELS)],
                                   "validation row 0")
    try:
        check_base(base, kind_of(KIND), "zoo", TrainSpec(steps=1, dropout=dropout))
        task.check_model(base)
        return None, check_fusable(resolve_targets(base, "all-linear"),
                                   task.layers_off_the_rows(base, ADAPTABLE), "all-linear")
    except StudyError as exc:
        return str(exc), None


def test_every_image_classifier_transformers_builds_has_a_tiny_config():
    assert set(model_types()) == set(TINY)


def test_refusals_are_one_line_that_names_why():
    for class_name in classifiers():
        what, why = verdict(class_name)
        assert "\n" not in why and (what == EXACT) == (why == ""), class_name


@pytest.mark.parametrize("class_name", classifiers())
def test_alone_fused_and_peft_agree_or_the_model_is_refused(class_name):
    what, _ = verdict(class_name)
    if what not in CHECKED:
        return  # the line is the result (test_refusals_are_one_line_that_names_why)
    base = tiny_model(class_name)
    dropout, ks = CHECKED[what]
    for k in ks:
        check_dropout_against_peft(class_name, KIND, "lora", k, "eager", base=base,
                                   dropout=dropout)


def test_drop_path_is_drawn_per_trial_and_tiled():
    """Swin's stochastic depth (drop_path_rate 0.1 by default) drops the same examples'
    branches in each trial of a group as alone. Without the tiling the fused pairs of Swin,
    Donut-Swin and BEiT above differ from PEFT by 5e-5 to 2e-4 relative after 5 steps here
    (0.16 to 0.34 in larger configs, as reported in issue 33)."""
    assert tiny_model("SwinForImageClassification").config.drop_path_rate > 0
    assert verdict("SwinForImageClassification")[0] == EXACT


def test_a_layer_on_a_table_shared_by_the_examples_trains_its_trials_one_at_a_time():
    """Swin v2's relative-position MLP computes on one table for all examples: a fused group
    cannot give each trial its own adapter there, so its trials train alone (exact, as PEFT);
    an adapter the forward never calls (SigLIP's MultiheadAttention out_proj) is refused."""
    what, why = verdict("Swinv2ForImageClassification")
    assert what == EXACT_ALONE and "continuous_position_bias_mlp" in why
    what, why = verdict("SiglipForImageClassification")
    assert what == "refused" and "head.attention.out_proj" in why and "never trains" in why


def test_a_batchnorm_model_is_refused_in_train_mode_naming_the_layer():
    what, why = verdict("MobileViTForImageClassification")
    assert what == EXACT_OFF
    assert why.startswith("train.dropout: model: layer mobilevit.conv_stem.normalization "
                          "(BatchNorm2d)") and "set train.dropout: off" in why


def test_a_head_with_a_norm_trains_the_norm_as_modules_to_save_does():
    """LeViT's classifier holds a BatchNorm1d before its linear layer: its weight and bias
    train per trial (with train.dropout: off the norm uses its running statistics)."""
    assert verdict("LevitForImageClassification")[0] == EXACT_OFF


def test_every_head_that_makes_logits_trains():
    """A classifier's other heads (LeViT's and DeiT's distillation heads, HGNetV2's `fc`) train
    as `classifier` does: left out, they would stay at their random init on both sides, and
    PEFT's equivalence alone would not tell."""
    from lorasweep.methods.targets import head_module_names

    assert head_module_names(tiny_model("LevitForImageClassificationWithTeacher")) == [
        "classifier", "classifier_distill"]
    assert head_module_names(tiny_model("HGNetV2ForImageClassification")) == ["classifier", "fc"]
    assert head_module_names(tiny_model("ViTForImageClassification")) == ["classifier"]


def table() -> str:
    """The Markdown table of the verdicts, as docs/images.md shows it."""
    rows = ["| class (model type) | with lorasweep | why |", "|---|---|---|"]
    for class_name in classifiers():
        what, why = verdict(class_name)
        rows.append(f"| `{class_name}` ({model_type_of(class_name)}) | {what} | "
                    f"{why.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def summary() -> str:
    """The verdicts as README.md lists them: the classes under each verdict."""
    lines = []
    for what in (*CHECKED, "refused", "not built here"):
        types = [f"`{t}`" for t in classifiers() if verdict(t)[0] == what]
        if not types:
            continue
        lines.append(f"- {what} ({len(types)}): {', '.join(types)}")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- vision-zoo: begin -->\n", "<!-- vision-zoo: end -->"
WRITTEN = {"docs/images.md": table, "README.md": summary}


def test_the_docs_table_and_readme_list_are_these_verdicts():
    for name, write in WRITTEN.items():
        text = (ROOT / name).read_text()
        assert text[text.index(BEGIN) + len(BEGIN):text.index(END)] == write(), \
            f"{name}: run .venv/bin/python scripts/zoo_tables.py"


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    from .test_image_classification import write_images

    root = tmp_path_factory.mktemp("zoo-images") / "data"
    write_images(root / "train", 8, 0, size=(PIXELS, PIXELS))
    return root


def saved(class_name: str, folder: Path) -> Path:
    """The tiny classifier as a model folder, with an image processor to 32 pixels."""
    from transformers import ViTImageProcessorPil

    tiny_model(class_name).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": PIXELS, "width": PIXELS}).save_pretrained(folder)
    return folder


def test_the_cli_refuses_as_the_verdicts_say_and_runs_what_they_allow(image_data, tmp_path,
                                                                      capsys):
    """Through `lorasweep run`: LeViT's BatchNorm refused in train mode (exit 2, one line,
    nothing recorded), trained with train.dropout: off and exported to PEFT with its head's norm
    (the adapter reproduces the trial's outputs); Swin v2's trials planned one at a time, with
    the line that says why."""
    from lorasweep.cli import main

    from .conftest import assert_lora_trial_exports, refused, write_study
    from .test_image_classification import image_study

    study = image_study(image_data, validation_size=4)
    study["search"]["methods"] = ["lora"]
    study["model"] = {"source": str(saved("LevitForImageClassification", tmp_path / "levit"))}
    swinv2 = str(saved("Swinv2ForImageClassification", tmp_path / "swinv2"))
    capsys.readouterr()  # what saving printed
    assert refused(tmp_path, study, capsys) == "lorasweep: error: " + verdict(
        "LevitForImageClassification")[1]
    study["train"]["dropout"] = "off"
    out = tmp_path / "levit-run"
    assert main(["run", str(write_study(tmp_path / "levit.yaml", study)), "--out",
                 str(out)]) == 0
    assert (out / "trials.csv").read_text().count(",complete,") == 2
    pixels = torch.randn((4, 3, PIXELS, PIXELS), generator=torch.Generator().manual_seed(0))
    assert_lora_trial_exports(out, tmp_path / "adapter", KIND, LABELS, {"pixel_values": pixels})
    study["model"] = {"source": swinv2}
    study["train"]["dropout"] = "model"
    study["search"]["ranks"] = [1]  # its position MLP ends in a layer one head wide
    capsys.readouterr()
    assert main(["run", str(write_study(tmp_path / "swinv2.yaml", study)), "--dry-run",
                 "--max-group", "2"]) == 0
    shown = capsys.readouterr().out
    assert "K=1, lr" in shown and "K=2, lr" not in shown
    assert "continuous_position_bias_mlp" in shown and "train one at a time" in shown
