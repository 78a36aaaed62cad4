"""`lorasweep export` writes PEFT adapters that reproduce the trained model's outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorasweep.cli import main
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import TrialSpec
from lorasweep.study.folder import load_folder_study, weights_path
from lorasweep.study.store import Store
from lorasweep.workbench import attach_trials

from .conftest import read_rows


def trained_model(folder: Path, spec: TrialSpec, base: torch.nn.Module) -> torch.nn.Module:
    """Our model of a finished trial, rebuilt from its cell, seed and saved weights."""
    model, attached = attach_trials(base, [spec])
    saved = load_file(str(weights_path(folder, spec.grid_id)))
    with torch.no_grad():
        for name, param in attached.trial_params[0]:
            param.copy_(saved[name])
    return model.eval()


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, request) -> Path:
    from .conftest import make_records, tiny_study, write_jsonl

    root = tmp_path_factory.mktemp("export")
    data = {"train": write_jsonl(root / "train.jsonl", make_records(120, 0)),
            "test": write_jsonl(root / "test.jsonl", make_records(30, 1))}
    study = tiny_study(data, train={"steps": 6},
                       search={"methods": ["lora", "rslora", "loraplus", "dora", "pissa",
                                           "olora", "init_ab", "random_ab", "full"],
                               "lr": [3e-3]})
    import yaml

    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--out", str(root / "study")]) == 0
    return root / "study"


@pytest.mark.parametrize("method", ["lora", "rslora", "loraplus", "dora", "pissa", "olora",
                                    "init_ab", "random_ab"])
def test_export_reproduces_outputs(finished_study: Path, tmp_path: Path, method):
    row = next(r for r in read_rows(finished_study) if r["method"] == method)
    out = tmp_path / "adapter"
    assert main(["export", str(finished_study), "--trial", row["trial"], str(out)]) == 0
    assert (out / "adapter_config.json").exists()
    assert (out / "adapter_model.safetensors").exists()

    study = load_folder_study(finished_study)
    tokenizer = load_tokenizer(study.model)
    base = load_model(study.model, "classification", 3, tokenizer)
    spec = next(TrialSpec.from_attrs(t.user_attrs) for t in Store(finished_study, "tiny", True)
                .trials() if t.user_attrs["grid_id"] == int(row["trial"]))
    ours = trained_model(finished_study, spec, base)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ids = torch.randint(1000, 3000, (4, 10), generator=torch.Generator().manual_seed(0))
    a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-5
    untrained = copy.deepcopy(base)
    assert not torch.allclose(a, untrained(input_ids=ids).logits, atol=1e-4)


def test_export_refuses_full_fine_tuning_and_unknown_trials(finished_study, tmp_path, capsys):
    full = next(r for r in read_rows(finished_study) if r["method"] == "full")
    assert main(["export", str(finished_study), "--trial", full["trial"], str(tmp_path / "x")]) == 2
    assert "full fine-tuning" in capsys.readouterr().err
    assert main(["export", str(finished_study), "--trial", "999", str(tmp_path / "y")]) == 2
    assert "no such trial" in capsys.readouterr().err
