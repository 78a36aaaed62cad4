"""Vision-language models (task.kind vision_language): tiny random-weight LLaVA, Qwen2-VL,
Idefics3 and their relatives (tests/vlm_zoo.py, built as transformers' own tests build them)
trained as lorasweep trains them: LoRA alone and fused equals stock PEFT, on the batches the task
makes from TRL-format rows with the model's own processor; the parts of each model are found;
bad rows are one line naming the row as stored."""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from lorasweep.config import Study
from lorasweep.config.loading import validate_study
from lorasweep.methods.targets import part_of, resolve_targets
from lorasweep.models import load_processor
from lorasweep.tasks import build_task
from lorasweep.tasks.vision_language import VisionLanguageTask

from .test_peft_equivalence import check_dropout_against_peft
from .vlm_zoo import FAMILIES, build, records

KIND = "vision_language"
# PEFT equivalence on these (the three families, and Qwen's later releases)
CHECKED = [f for f in ("llava", "qwen2_vl", "idefics3", "smolvlm", "qwen2_5_vl", "qwen3_vl",
                       "llava_next") if f in FAMILIES]


# the tiny models and their data, built once per test process, removed when it ends
SCRATCH = tempfile.TemporaryDirectory(prefix="lorasweep-vlm-")


@functools.cache
def folder(family: str) -> Path:
    return build(family, Path(SCRATCH.name) / family)


def parquet(rows: list[dict], path: Path) -> Path:
    """Rows in TRL's format as a datasets-style parquet file (images as PNG bytes)."""
    def stored(image: Image.Image) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    pd.DataFrame([{**row, "images": [stored(i) for i in row["images"]]}
                  for row in rows]).to_parquet(path)
    return path


def study(family: str, data: Path, **task) -> Study:
    return validate_study({
        "name": f"vlm-{family}", "model": {"source": str(folder(family))},
        "task": {"kind": KIND, "train_file": str(data), "validation_size": 4, **task},
        "train": {"steps": 5, "batch_size": 4, "seq_len": 512},
        "search": {"methods": [{"name": "lora", "lr": [1e-3]}]}}, "test")


@functools.cache
def task_of(family: str) -> VisionLanguageTask:
    data = parquet(records(12), Path(SCRATCH.name) / f"{family}-rows.parquet")
    spec = study(family, data)
    task = build_task(spec, load_processor(spec.model))
    assert isinstance(task, VisionLanguageTask)
    return task


def base_of(family: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForImageTextToText.from_pretrained(folder(family)).eval()


def data_of(family: str):
    """Each step's batch as the task makes it: 4 rows with their images."""
    task = task_of(family)

    def data(step: int):
        index = torch.arange(4) + 4 * (step % 2)
        batch = task.train.batch(index, 1)
        return {n: t for n, t in batch.items() if n != "labels"}, batch["labels"]

    return data


@pytest.mark.numerics
@pytest.mark.parametrize("k", [1, 2], ids=["alone", "fused"])
@pytest.mark.parametrize("family", CHECKED)
def test_lora_on_every_linear_layer_matches_peft(family, k):
    """Vision tower, projector and language model adapted (all-linear), lora_dropout 0.2, the
    model's own dropout: losses, step-0 gradients and 5 AdamW steps within 1e-6 of PEFT."""
    check_dropout_against_peft(family, KIND, "lora", k, "eager", base=base_of(family),
                               data=data_of(family))


@pytest.mark.numerics
@pytest.mark.parametrize("family", CHECKED[:3])
def test_lora_on_the_language_model_only_matches_peft(family):
    check_dropout_against_peft(family, KIND, "lora", 2, "eager", base=base_of(family),
                               data=data_of(family), targets="language")


@pytest.mark.parametrize("family", CHECKED)
def test_each_model_has_its_three_parts(family):
    """Every family's linear layers fall in language, projector and vision, none empty."""
    base = base_of(family)
    parts = {part: resolve_targets(base, part) for part in ("language", "projector", "vision")}
    assert all(parts.values()), {p: len(v) for p, v in parts.items()}
    assert sum(map(len, parts.values())) == len(resolve_targets(base, "all-linear"))
    assert resolve_targets(base, "language+projector") == [
        n for n in resolve_targets(base, "all-linear") if part_of(n) != "vision"]


def test_a_regex_picks_layers_as_peft_matches_a_string():
    base = base_of("qwen2_vl")
    chosen = resolve_targets(base, r"re:.*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc\d)")
    assert chosen and all(part_of(n) == "vision" for n in chosen)


def test_a_fused_batch_is_k_copies_of_the_rows_and_their_images():
    """K trials see their rows' tokens and images as K blocks end to end (Qwen's flattened
    patches and image grids too), as the PEFT checks above feed them."""
    for family in ("llava", "qwen2_vl", "idefics3"):
        split = task_of(family).train
        index = torch.tensor([0, 2, 3])
        one, two = split.batch(index, 1), split.batch(index, 2)
        assert set(one) == set(two)
        for name, t in one.items():
            expected = t if name == "labels" else torch.cat([t, t])
            assert torch.equal(two[name], expected), (family, name)


def test_labels_are_the_assistant_replies_only():
    """With loss_on assistant (the default for chat data) the scored tokens are each reply and
    the end of its turn; with loss_on all every text token but the image tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder("llava"))
    task = task_of("llava")
    for row, record in enumerate(records(12)[:2]):
        labels = task.train.labels[row]
        del record  # the split is shuffled: read the reply back from the labels
        scored = processor.tokenizer.decode(labels[labels != -100])
        assert scored.startswith("A ") and scored.endswith(".<|im_end|>\n"), scored


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    return records(10)


def _run_refused(tmp_path, capsys, rows: list[dict], family: str = "llava", **task) -> str:
    from .conftest import refused

    data = parquet(rows, tmp_path / "rows.parquet")
    raw = study(family, data, **task).model_dump(mode="json")
    capsys.readouterr()  # what building the model printed
    return refused(tmp_path, raw, capsys)


def test_a_row_whose_images_do_not_match_its_image_entries_is_one_line(tmp_path, capsys,
                                                                       rows):
    rows[7]["images"] = []
    err = _run_refused(tmp_path, capsys, rows)
    assert err == ("lorasweep: error: task.image_field: row 7 of the training data has 1 image "
                   "entry in its turns and 0 images in 'images'; they must match, in order")


def test_an_unreadable_image_is_one_line_naming_the_row(tmp_path, capsys, rows):
    from .conftest import refused

    data = parquet(rows, tmp_path / "rows.parquet")
    table = pd.read_parquet(data)
    table.at[3, "images"] = [{"bytes": b"not a png", "path": None}]
    table.to_parquet(data)
    spec = study("llava", data).model_dump(mode="json")
    capsys.readouterr()  # what building the model printed
    err = refused(tmp_path, spec, capsys)
    assert err.startswith("lorasweep: error: task.image_field: row 3 of the training data, "
                          "image 0 cannot be read as an image"), err


def test_a_model_without_a_processor_or_chat_template_is_one_line(tmp_path, capsys, rows):
    import json

    from .conftest import refused

    spec = study("llava", parquet(rows, tmp_path / "rows.parquet")).model_dump(mode="json")
    capsys.readouterr()  # what building the model printed

    spec["model"] = {"source": "smollm2"}  # a text model: its AutoProcessor is a tokenizer
    assert refused(tmp_path, spec, capsys) == (
        "lorasweep: error: model.source: 'smollm2' has no processor of text and images (its "
        "AutoProcessor is a tokenizer only); a vision_language task needs one "
        "(processor_config.json or preprocessor_config.json beside a tokenizer)")
    bare = tmp_path / "no-template"
    import shutil

    shutil.copytree(folder("llava"), bare)
    for path in bare.glob("*"):
        if "chat_template" in path.name:
            path.unlink()
    config = bare / "processor_config.json"
    if config.exists():
        values = json.loads(config.read_text())
        values.pop("chat_template", None)
        config.write_text(json.dumps(values))
    spec["model"] = {"source": str(bare)}
    assert refused(tmp_path, spec, capsys) == (
        "lorasweep: error: task.messages_field: the model's processor has no chat template; "
        "give it one (chat_template.jinja beside its processor_config.json)")


def test_a_study_of_parts_runs_reports_lr_star_per_part_and_exports(tmp_path, capsys, rows):
    """LoRA on the language model, and on all three parts, and full fine-tuning of each choice,
    through `lorasweep run`: each its own cell with lr_star in the report; a LoRA trial exported
    to PEFT reproduces itself."""
    from lorasweep.cli import main

    from .conftest import assert_lora_trial_exports, read_rows, write_study

    spec = study("qwen2_vl", parquet(records(16), tmp_path / "rows.parquet")).model_dump(
        mode="json")
    del spec["search"]["target_modules"]
    spec["train"]["steps"] = 3
    spec["search"]["methods"] = [{"name": "lora", "lr": [1e-3, 1e-2]},
                                 {"name": "full", "lr": [1e-4]}]
    spec["search"]["recipe"] = {"target_modules": ["language", "language+projector+vision"]}
    out = tmp_path / "run"
    assert main(["run", str(write_study(tmp_path / "parts.yaml", spec)), "--out",
                 str(out)]) == 0
    cells = {(r["method"], r["target_modules"]) for r in read_rows(out)}
    assert cells == {(m, t) for m in ("lora", "full")
                     for t in ("language", "language+projector+vision")}
    report = (out / "report.md").read_text()
    assert "| full language |" in report and "| lora r=8 a=2r language+projector+vision |" \
        in report
    task = task_of("qwen2_vl")
    inputs = {n: t for n, t in task.validation.batch(torch.arange(2), 1).items()
              if n != "labels"}
    assert_lora_trial_exports(out, tmp_path / "adapter", KIND, None, inputs)


def test_the_gpu_example_loads_expands_and_its_dry_run_predicts_memory(tmp_path, capsys):
    """examples/vlm_qwen2vl_gpu.yaml: three choices of parts, LoRA at two ranks and full
    fine-tuning of each; its dry run on a tiny Qwen2-VL in its place (the real one is on the
    hub) predicts each group's peak memory."""
    import yaml

    from lorasweep.cli import main
    from lorasweep.config.loading import load_study
    from lorasweep.space import expand_trials

    from .conftest import write_study

    path = Path(__file__).resolve().parents[1] / "examples" / "vlm_qwen2vl_gpu.yaml"
    example = load_study(path)
    assert example.task.kind == KIND and example.task.messages_field == "messages"
    assert example.task.image_field == "images"
    trials = expand_trials(example)
    parts = ["language", "language+projector", "language+projector+vision"]
    assert {(t.cell.method, t.cell.target_modules) for t in trials} == {
        (m, p) for m in ("lora", "full") for p in parts}
    assert len(trials) == 3 * 2 * 7 + 3 * 5
    raw = yaml.safe_load(path.read_text())
    raw["model"]["source"] = str(folder("qwen2_vl"))
    raw["task"] = {"kind": KIND, "train_file": str(parquet(records(16), tmp_path / "r.parquet")),
                   "validation_size": 4}
    raw["train"].update(precision="fp32", seq_len=256, batch_size=4, grad_accum=1)
    raw["search"]["ranks"] = [4, 16]  # the tiny model's layers are 16 wide at the narrowest
    capsys.readouterr()
    assert main(["run", str(write_study(tmp_path / "example.yaml", raw)), "--dry-run",
                 "--max-group", "2"]) == 0
    shown = capsys.readouterr().out
    for part in parts:
        assert f"lora r=4 lora_alpha=8 kaiming {part} seed 0: K=2" in shown
        assert f"full {part} seed 0: K=1" in shown
    assert shown.count("predicted peak") == 3 * 2 * 4 + 3 * 5


@functools.cache
def parts_of_every_model() -> dict[str, tuple[int, int, int] | str]:
    """Each image-text-to-text model type transformers builds, from its default config on the
    meta device (no memory): the linear layers LoRA's `all-linear` would adapt in its language
    model, projector and vision tower, or why it is not built from its default config."""
    import collections
    import warnings

    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    from lorasweep.methods.targets import all_linear

    out: dict[str, tuple[int, int, int] | str] = {}
    for model_type in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = AutoModelForImageTextToText.from_config(
                    AutoConfig.for_model(model_type))
        except ImportError:
            out[model_type] = "needs a package lorasweep does not install (timm)"
            continue
        except Exception as exc:  # a default config some releases cannot build from
            out[model_type] = f"not built from its default config ({type(exc).__name__})"
            continue
        counts = collections.Counter(part_of(name) for name in all_linear(model))
        out[model_type] = (counts["language"], counts["projector"], counts["vision"])
    return out


def parts_table() -> str:
    rows = ["| model type | language | projector | vision |", "|---|---|---|---|"]
    for model_type, found in parts_of_every_model().items():
        cells = " | ".join(map(str, found)) if isinstance(found, tuple) else f"{found} | | "
        rows.append(f"| `{model_type}` | {cells} |")
    return "\n".join(rows) + "\n"


BEGIN, END = "<!-- vlm-parts: begin -->\n", "<!-- vlm-parts: end -->"
WRITTEN = {"docs/vision-language.md": parts_table}


def test_the_parts_of_every_image_text_to_text_model_are_the_docs_table():
    """Every model type transformers maps to AutoModelForImageTextToText, enumerated, not
    picked: the layers found in each part are docs/vision-language.md's table, and most find
    all three (those that do not are shown there with zeros)."""
    root = Path(__file__).resolve().parents[1]
    found = parts_of_every_model()
    built = [f for f in found.values() if isinstance(f, tuple)]
    assert all(language > 0 for language, _, _ in built)
    assert sum(all(f) for f in built) >= 0.75 * len(built)
    for family in ("llava", "qwen2_vl", "idefics3", "smolvlm", "qwen3_vl", "mllama"):
        assert all(found[family]), family
    text = (root / "docs/vision-language.md").read_text()
    assert text[text.index(BEGIN) + len(BEGIN):text.index(END)] == parts_table(), \
        "run .venv/bin/python scripts/zoo_tables.py"
