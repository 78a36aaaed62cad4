"""A study folder written before a refactor keeps working: tests/data/compat-849cdad was written by
lorasweep at commit 849cdad (the main before issue 18's typed cells and store refactors) from
tests/data/compat-849cdad.yaml (tiny:llama, causal LM; LoRA, LoRA+, full fine-tuning and a
labelled peft entry; two ranks, two lora_alpha forms, a batch-size recipe axis), then measured
by `lorasweep curvature` (LoRA, full and the peft entry at rank 4). Its report.html, figures and
all but two adapters are left out to keep the repository small; everything else is as written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lorasweep.cli import main
from lorasweep.study.folder import load_folder_study

FIXTURE = Path(__file__).resolve().parent / "data" / "compat-849cdad"
WRITTEN = ("trials.csv", "optima.csv", "report.md")
# A number printed in full (optima.csv's fitted LRs): its last digits depend on the CPU's BLAS
# kernels (the fixture was written on another machine), so it is compared to 1e-9, all else exact.
FULL_FLOAT = re.compile(r"-?\d+\.\d{10,}(?:e[-+]?\d+)?")


def assert_same_text(written: str, expected: str, name: str) -> None:
    """Byte for byte, except full-precision numbers, which agree to 1e-9 relative."""
    assert FULL_FLOAT.sub("#", written) == FULL_FLOAT.sub("#", expected), name
    pairs = zip(FULL_FLOAT.findall(written), FULL_FLOAT.findall(expected), strict=True)
    for ours, theirs in pairs:
        assert float(ours) == pytest.approx(float(theirs), rel=1e-9), (name, ours, theirs)


@pytest.fixture
def old_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "compat"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_an_earlier_folder_reports_the_same(old_folder: Path):
    """trials.csv from its journal, optima.csv and report.md (with the curvature section read
    from its curvature.csv, every lr_star matched, the peft entry's by its label) come out
    as the earlier lorasweep wrote them (fitted numbers to 1e-9, see FULL_FLOAT)."""
    for name in WRITTEN:
        (old_folder / name).unlink()
    assert main(["report", str(old_folder)]) == 0
    for name in WRITTEN:
        assert_same_text((old_folder / name).read_text(), (FIXTURE / name).read_text(), name)
    assert "| gauss r=4 a=2r peft batch_size=4 | 0.02662 | 1.12 | 0.03057 |" in \
        (old_folder / "report.md").read_text()


def test_an_earlier_folder_resumes_with_nothing_to_train(old_folder: Path, capsys):
    assert main(["run", str(old_folder / "study.yaml"), "--out", str(old_folder)]) == 0
    out = capsys.readouterr().out
    assert "trained 0 trials" in out and "78 trials: 78 complete" in out
    assert (old_folder / "trials.csv").read_text() == (FIXTURE / "trials.csv").read_text()
    assert main(["status", str(old_folder)]) == 0
    assert "Best: full batch_size=8: eval_loss 7.443" in capsys.readouterr().out
    # trained before train.dropout existed, i.e. with dropout off: resumed, it stays off
    stored = yaml.safe_load((old_folder / "study.yaml").read_text())
    assert stored["train"]["dropout"] == "off"


def test_an_earlier_folder_reads_as_trained_with_dropout_off(old_folder: Path, capsys):
    """Its study.yaml has no train.dropout: it reads as `off` (what its trials were trained
    with), not a new file's default `model`; a study file asking for `model` there is refused."""
    assert "dropout" not in (old_folder / "study.yaml").read_text()
    assert load_folder_study(old_folder).train.dropout == "off"
    assert main(["run", str(old_folder / "study.yaml"), "--out", str(old_folder),
                 "--set", "train.dropout=model"]) == 2
    err = capsys.readouterr().err
    assert "different train.dropout" in err and len(err.strip().splitlines()) == 1, err


def test_an_earlier_folder_exports_and_suggests(old_folder: Path, tmp_path: Path, capsys):
    for trial, flags in (("7", {"use_rslora": False, "init_lora_weights": True}),
                         ("55", {"init_lora_weights": "gaussian"})):  # a peft entry
        out = tmp_path / f"adapter-{trial}"
        assert main(["export", str(old_folder), "--trial", trial, str(out)]) == 0
        config = json.loads((out / "adapter_config.json").read_text())
        assert {k: config[k] for k in flags} == flags
    capsys.readouterr()
    assert main(["suggest", "--from", str(old_folder), "--rank", "8", "--method", "lora"]) == 0
    assert "lora a=2r" in capsys.readouterr().out


def test_a_torn_weights_file_is_one_line(old_folder: Path, tmp_path: Path, capsys):
    """An adapter file cut short (a copy interrupted) is one line naming it; nothing written."""
    weights = old_folder / "adapters" / "trial-7.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    out = tmp_path / "adapter"
    assert main(["export", str(old_folder), "--trial", "7", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lorasweep: error: --trial 7: its weights file {weights} cannot be read (Error while "
        "deserializing header: invalid header length)"]
    assert not out.exists()
