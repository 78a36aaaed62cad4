"""The offline vision demo: the built-in digits rebuild byte for byte from their script, the
tiny base `digits-vit` loads offline and scores on its own digits what its README says, and
`lorasweep run vision`, cut down, trains both methods well above chance."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from lorasweep.cli import main
from lorasweep.config import validate_study
from lorasweep.models import load_image_processor
from lorasweep.packaged_models import packaged_model_path
from lorasweep.tasks import build_task
from lorasweep.tasks.data import BUILTIN_DATA_DIR

from .conftest import read_rows

ROOT = Path(__file__).resolve().parent.parent
DIGITS = BUILTIN_DATA_DIR / "digits"
# The files as committed: a change to them must come with a change here (and to their README).
SHA256 = {
    "0-4/train.parquet": "4f130f2b90409a457eed3191b08ecfde312f1cc5d319ee1eea521587c5e28a38",
    "0-4/test.parquet": "bb3d88025985d9dd0063eafe6e410281b6340d956f68adfaf54198ad12b5ba8f",
    "5-9/train.parquet": "e9880daba296ff5d94421e64b8885b117deb1111c54548e34294f19b1f32fd9c",
    "5-9/test.parquet": "1955fde739b868201cfd0b8a532040b06f45f1ccf0032872dc6a2b605ed5bc16",
}


def test_the_digits_files_are_the_pinned_ones():
    for name, digest in SHA256.items():
        assert hashlib.sha256((DIGITS / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn not installed (only scripts/build_digits.py needs it)")
def test_the_digits_rebuild_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_digits.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for name in SHA256:
        assert without_writer((tmp_path / name).read_bytes()) == without_writer(
            (DIGITS / name).read_bytes()), name


def without_writer(parquet: bytes) -> bytes:
    """A parquet file's bytes but for the version its footer names as the writer's (pyarrow is
    not pinned: MLflow, a test dependency, holds it below 26, so the set-up's may differ from
    the one that wrote the shipped files; the data and its layout may not)."""
    return re.sub(rb"parquet-cpp-arrow version [0-9.]+", b"parquet-cpp-arrow version X", parquet)


def test_the_base_scores_on_its_own_digits_as_documented():
    """digits-vit loads offline (HF_HUB_OFFLINE=1, conftest) with its own image processor and
    classifies 177 of the 180 test images of digits 0-4 (its README: 0.9833)."""
    study = validate_study({"name": "digits", "model": {"source": "digits-vit"},
                            "task": {"kind": "image_classification",
                                     "dataset": "builtin:digits-0-4", "validation_size": 90},
                            "train": {"steps": 1}, "search": {"methods": ["lora"], "lr": [1e-3]}},
                           "test")
    task = build_task(study, load_image_processor(study.model))
    model = AutoModelForImageClassification.from_pretrained(packaged_model_path("digits-vit"))
    assert task.label_names == [model.config.id2label[i] for i in range(5)]
    with torch.no_grad():
        logits = model(pixel_values=task.test.inputs["pixel_values"]).logits
    assert int((logits.argmax(-1) == task.test.labels).sum()) == 177


def test_the_vision_demo_runs_cut_down(tmp_path):
    """Each method at its grid's best LR (README, "Vision quickstart"), 20 steps: both learn
    digits 5-9 well above chance (0.2)."""
    out = tmp_path / "vision"
    assert main(["run", "vision", "--out", str(out), "--threads", "1",
                 "--set", "train.steps=20", "--set",
                 "search.methods=[{name: lora, lr: [1.0e-2]}, {name: full, lr: [3.16228e-3]}]"]
                ) == 0
    rows = read_rows(out)
    assert [r["method"] for r in rows] == ["lora", "full"]
    assert all(r["status"] == "complete" and float(r["accuracy"]) > 0.5 for r in rows), rows
