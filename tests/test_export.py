"""`lorasweep export` writes PEFT adapters that reproduce the trained model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorasweep.cli import main
from lorasweep.curvature.command import measured_optima
from lorasweep.models import load_model, load_tokenizer
from lorasweep.records import OPTIMA_CSV
from lorasweep.study.backend import JOURNAL_NAME
from lorasweep.study.defaults import STORAGE_ENV
from lorasweep.study.folder import STORAGE_FILE, load_folder_study
from lorasweep.workbench import attach_group, load_workbench

from .conftest import (
    assert_export_reproduces,
    load_trained,
    make_records,
    read_rows,
    tiny_study,
    trained_model,
    trial_spec,
    write_jsonl,
)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, request) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = {"train": write_jsonl(root / "train.jsonl", make_records(120, 0)),
            "test": write_jsonl(root / "test.jsonl", make_records(30, 1))}
    # a lora_dropout in a study that also fine-tunes in full: the adapter cells take it
    study = tiny_study(data, train={"steps": 6, "lora_dropout": 0.1},
                       search={"methods": ["lora", "rslora", "loraplus", "dora", "pissa",
                                           "olora", "init_ab", "random_ab", "full"],
                               "lr": [3e-3]})
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
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert (out / "adapter_model.safetensors").exists()

    study = load_folder_study(finished_study)
    tokenizer = load_tokenizer(study.model)
    base = load_model(study.model, "classification", 3, tokenizer)
    ours = trained_model(finished_study, trial_spec(finished_study, int(row["trial"])), base)
    assert_export_reproduces(ours, base, out, (1000, 3000))


def test_export_refuses_full_fine_tuning_and_unknown_trials(finished_study, tmp_path, capsys):
    full = next(r for r in read_rows(finished_study) if r["method"] == "full")
    assert main(["export", str(finished_study), "--trial", full["trial"], str(tmp_path / "x")]) == 2
    assert "full fine-tuning" in capsys.readouterr().err
    assert main(["export", str(finished_study), "--trial", "999", str(tmp_path / "y")]) == 2
    assert "no such trial" in capsys.readouterr().err


def adapter(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An exported adapter folder's config and tensors."""
    return (json.loads((out / "adapter_config.json").read_text()),
            load_file(str(out / "adapter_model.safetensors")))


@pytest.fixture(scope="module")
def in_database_and_journal(tmp_path_factory, postgres) -> tuple[Path, Path, str]:
    """One LoRA trial run twice: its records in PostgreSQL (a password-protected role), then in
    the folder's journal; the two folders and the database URL with its password."""
    root = tmp_path_factory.mktemp("storages")
    data = {"train": write_jsonl(root / "train.jsonl", make_records(120, 0)),
            "test": write_jsonl(root / "test.jsonl", make_records(30, 1))}
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_study(data, train={"steps": 6},
                                              search={"methods": ["lora"], "lr": [3e-3]})))
    url = postgres.new_database(password="pw-export")
    assert main(["run", str(path), "--out", str(root / "database"), "--storage", url]) == 0
    assert main(["run", str(path), "--out", str(root / "journal")]) == 0
    assert (root / "database" / STORAGE_FILE).exists()
    assert not (root / "database" / JOURNAL_NAME).exists(), "its records are in the database"
    return root / "database", root / "journal", url


def test_export_reads_a_postgres_backed_folder(in_database_and_journal, tmp_path, monkeypatch,
                                               capsys):
    """`export` finds the trial in the database the folder names (the password from
    $LORASWEEP_STORAGE, as `status` and `report` take it) and writes the adapter the same
    study's journal-backed folder exports."""
    in_database, in_journal, url = in_database_and_journal
    assert main(["export", str(in_database), "--trial", "0", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "password" in err[0] and "pw-export" not in err[0], err
    monkeypatch.setenv(STORAGE_ENV, url)
    for folder in (in_database, in_journal):
        assert main(["export", str(folder), "--trial", "0", str(tmp_path / folder.name)]) == 0
    config, tensors = adapter(tmp_path / "database")
    journal_config, journal_tensors = adapter(tmp_path / "journal")
    assert config == journal_config and tensors.keys() == journal_tensors.keys()
    assert all(torch.equal(tensors[name], journal_tensors[name]) for name in tensors)


def test_curvature_reads_optima_from_a_postgres_backed_folder(in_database_and_journal,
                                                              monkeypatch):
    """`lorasweep curvature DIR` takes measured optima from the folder's records wherever they
    live, not from the journal file only."""
    in_database, in_journal, url = in_database_and_journal
    monkeypatch.setenv(STORAGE_ENV, url)
    (in_database / OPTIMA_CSV).unlink(missing_ok=True)  # only its records can answer
    study = load_folder_study(in_database)
    from_database = measured_optima(in_database, study, None)
    assert len(from_database) == 1
    # repr: NaN (one LR, no refinement) compares equal only as text
    assert repr(from_database) == repr(measured_optima(in_journal, study, None))


def test_export_of_a_study_not_started_is_one_line(tmp_path, capsys):
    """A folder with its study file but no records: one line, exit 2, and nothing written."""
    folder = tmp_path / "study"
    folder.mkdir()
    data = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
    (folder / "study.yaml").write_text(yaml.safe_dump(tiny_study(data)))
    assert main(["export", str(folder), "--trial", "0", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorasweep: error: {folder}: the study has not started (no {JOURNAL_NAME})"]
    assert sorted(p.name for p in folder.iterdir()) == ["study.yaml"]
    assert not (tmp_path / "out").exists()


PEFT_ENTRIES = [{"name": "peft", "label": "gauss", "peft": {"init_lora_weights": "gaussian"}},
                {"name": "peft", "label": "peft-pissa", "peft": {"init_lora_weights": "pissa"}},
                {"name": "peft", "label": "loha", "peft_config": "LoHaConfig",
                 "peft": {"r": 4, "alpha": 8}},
                {"name": "peft", "label": "corda", "peft": {
                    "init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}}}]


@pytest.fixture(scope="module")
def peft_study(tmp_path_factory) -> Path:
    """Trials of peft entries: PEFT's plain LoRA, PEFT's PiSSA (it changes the base weight), a
    config that is no LoRA (LoHa) and CorDA (it looks at training batches and changes the base
    weight; on attention, as PEFT's CorDA hooks cannot take BERT's pooler)."""
    root = tmp_path_factory.mktemp("peft-export")
    data = {"train": write_jsonl(root / "train.jsonl", make_records(120, 0)),
            "test": write_jsonl(root / "test.jsonl", make_records(30, 1))}
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_study(data, train={"steps": 6},
                                              search={"methods": PEFT_ENTRIES, "lr": [1e-2],
                                                      "target_modules": "attention"})))
    assert main(["run", str(path), "--out", str(root / "study")]) == 0
    return root / "study"


@pytest.mark.parametrize("label", [e["label"] for e in PEFT_ENTRIES])
def test_a_peft_entry_exports_the_model_it_trained(peft_study: Path, tmp_path: Path, label):
    """The trial rebuilt as training built it, with its saved weights, scores the validation
    loss its run recorded; PEFT loads the export over the untouched base with the same outputs
    (PiSSA's through PEFT's conversion to plain LoRA, whose rank doubles)."""
    row = next(r for r in read_rows(peft_study) if r["method"] == label)
    out = tmp_path / "adapter"
    assert main(["export", str(peft_study), "--trial", row["trial"], str(out)]) == 0

    study = load_folder_study(peft_study)
    spec = trial_spec(peft_study, int(row["trial"]))
    bench = load_workbench(study)
    ours = load_trained(peft_study, spec,
                        *attach_group(bench.base, bench.task, study.train, [spec]))
    (metrics,) = bench.task.evaluate(ours, bench.task.validation, 1, 8, torch.device("cpu"))
    assert metrics["eval_loss"] == pytest.approx(float(row["eval_loss"]), rel=1e-5)
    assert_export_reproduces(ours, bench.base, out, (1000, 3000))
    config, _ = adapter(out)
    if label in ("peft-pissa", "corda"):  # converted to plain LoRA: rank 4, doubled
        assert (config["r"], config["init_lora_weights"]) == (8, True)
