"""Shared test fixtures: small learnable data files and study files on tiny models."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorasweep.sandbox import UNSAFE_ENV, unavailable_reason

from .system_parts import missing_reason, postgres_bindir, required

os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the test processes share the cores: one torch thread each (set before torch loads), not
    # two threads each contending for one core
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "sports": ["match", "goal", "team", "coach", "season", "league", "score", "player"],
    "weather": ["rain", "cloud", "storm", "sunny", "wind", "snow", "forecast", "cold"],
    "food": ["bread", "cheese", "soup", "apple", "dinner", "recipe", "salt", "butter"],
}
FILLER = ["the", "a", "today", "we", "saw", "some", "very", "and", "it", "was", "this", "of"]


def make_records(count: int, seed: int) -> list[dict]:
    """Sentences whose class shows in a few topic words among filler: learnable in a few steps."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        label = list(WORDS)[i % len(WORDS)]
        words = rng.choices(FILLER, k=8) + rng.choices(WORDS[label], k=3)
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def trial_records(rows: list) -> list:
    """Synthetic trials.csv-style rows (dicts, numbered when they have no `trial`) as the
    analysis takes them; records pass through."""
    from lorasweep.records import TrialRecord

    return [row if isinstance(row, TrialRecord) else TrialRecord.from_row({"trial": i, **row})
            for i, row in enumerate(rows)]


def trial_spec(folder: Path, grid_id: int):
    """A finished study's trial, as its store holds it."""
    from lorasweep.space import TrialSpec
    from lorasweep.study.folder import open_for_reading

    _, store = open_for_reading(folder)
    return next(TrialSpec.from_attrs(t.user_attrs) for t in store.trials()
                if t.user_attrs["grid_id"] == grid_id)


def load_trained(folder: Path, spec, model, attached):
    """`model` (the base with `spec`'s weights attached) given the trial's saved weights."""
    import torch
    from safetensors.torch import load_file

    from lorasweep.study.folder import weights_path

    saved = load_file(str(weights_path(folder, spec.grid_id)))
    with torch.no_grad():
        for name, param in attached.trial_params[0]:
            param.copy_(saved[name])
    return model.eval()


def trained_model(folder: Path, spec, base):
    """Our model of a finished trial, rebuilt from its cell, seed and saved weights."""
    from lorasweep.workbench import attach_trials

    return load_trained(folder, spec, *attach_trials(base, [spec]))


def assert_export_reproduces(ours, base, out: Path, inputs: tuple[int, int] | dict) -> None:
    """PEFT loads the adapter in `out` over an untouched copy of `base` with our trained model's
    logits (relative 1e-5), and those are not the untrained base's. `inputs`: model inputs, or
    the range of token ids to draw them from."""
    import copy

    import torch
    from peft import PeftModel

    from lorasweep.tasks import logits_of

    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    if isinstance(inputs, tuple):
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(*inputs, (4, 10), generator=generator)}
    with torch.no_grad():
        a, b = logits_of(ours, inputs), logits_of(theirs, inputs)
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert not torch.allclose(a, logits_of(base, inputs), atol=1e-4)


def write_study(path: Path, study: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(study))
    return path


def refused(tmp_path: Path, study: dict, capsys) -> str:
    """The one-line error of a run of `study`, which records nothing."""
    from lorasweep.cli import main

    out = tmp_path / "out"
    assert main(["run", str(write_study(tmp_path / "study.yaml", study)), "--out",
                 str(out)]) == 2
    assert not (out / "trials.csv").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def assert_study_lifecycle(folder: Path, capsys, metric: str) -> list[dict]:
    """A finished 4-trial study of LoRA and full fine-tuning: every trial complete with a test
    metric; a rerun trains nothing again; the report names `metric`; suggest predicts full
    fine-tuning's LR. Returns its rows."""
    from lorasweep.cli import main

    rows = read_rows(folder)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"complete"}
    assert all(r["test_metric"] for r in rows)
    assert main(["run", str(folder / "study.yaml"), "--out", str(folder)]) == 0
    assert read_rows(folder) == rows  # nothing left to train, nothing trained again
    assert main(["report", str(folder)]) == 0
    assert metric in (folder / "report.md").read_text()
    capsys.readouterr()
    assert main(["suggest", "--from", str(folder), "--to", "full"]) == 0
    assert "full" in capsys.readouterr().out
    return rows


def assert_lora_trial_exports(folder: Path, out: Path, kind: str, num_labels: int | None,
                              inputs: dict) -> None:
    """The study's first LoRA trial exported to `out` loads in PEFT over the base and
    reproduces our trained model on `inputs` (assert_export_reproduces)."""
    from lorasweep.cli import main
    from lorasweep.models import load_model, load_preprocessor
    from lorasweep.study.folder import load_folder_study

    row = next(r for r in read_rows(folder) if r["method"] == "lora")
    assert main(["export", str(folder), "--trial", row["trial"], str(out)]) == 0
    study = load_folder_study(folder)
    base = load_model(study.model, kind, num_labels, load_preprocessor(study.model, kind))
    ours = trained_model(folder, trial_spec(folder, int(row["trial"])), base)
    assert_export_reproduces(ours, base, out, inputs)


def differing_pair(base, cell):
    """Two copies of `base`: a K=2 LoRA group whose trial 1 has weights of its own (trial 0's
    perturbed), and that trial alone; a fused model must compute for trial 1 what it alone does."""
    import copy

    import torch

    from lorasweep.methods import get_method

    pair, single = copy.deepcopy(base), copy.deepcopy(base)
    attached = get_method("lora").attach(pair, cell, 2, torch.Generator().manual_seed(0))
    alone = get_method("lora").attach(single, cell, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for (_, p), (_, q) in zip(attached.trial_params[1], alone.trial_params[0], strict=True):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            q.copy_(p)
    return pair, single


GRID = [10 ** (-4 + i / 4) for i in range(13)]  # 1e-4 .. 1e-1, four points per decade


def rows_for(lr_true: float, seeds=(0,), noise: float = 0.0, rank: int = 8, method="lora",
             alpha_mode="per_rank", grid=GRID, maximize=True, diverge_above=None):
    """trials.csv-style rows of one cell whose metric peaks at lr_true (a parabola in log-LR),
    seeds offset by `noise`; LRs above `diverge_above` diverged."""
    rng = np.random.default_rng(rank)
    rows = []
    for seed in seeds:
        offset = rng.normal(0, noise)
        for lr in grid:
            quality = 0.9 - 0.1 * (math.log10(lr) - math.log10(lr_true)) ** 2 + offset
            status = "diverged" if diverge_above and lr > diverge_above else "complete"
            rows.append({"method": method, "rank": rank,
                         "lora_alpha": 2.0 * rank if alpha_mode == "per_rank" else 16.0,
                         "alpha_mode": alpha_mode, "init": "kaiming",
                         "target_modules": "all-linear", "lr": lr, "seed": seed,
                         "status": status,
                         "metric": None if status == "diverged" else
                         (quality if maximize else 2 - quality)})
    return rows


def read_rows(folder: Path) -> list[dict]:
    """The rows of a study folder's trials.csv."""
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, Path]:
    return {"train": write_jsonl(tmp_path / "train.jsonl", make_records(240, 0)),
            "test": write_jsonl(tmp_path / "test.jsonl", make_records(60, 1))}


def kill_mid_run(command: list[str], out: Path, name: str, complete: int, running: int,
                 timeout: float = 240) -> dict[str, str]:
    """Start `lorasweep run` (`command`) in a process, SIGKILL it once its store holds at least
    `complete` complete trials and exactly `running` running ones, and return each trial key's
    status at the kill."""
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter

    from lorasweep.study.store import Store

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorasweep.cli", *command], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = None
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if (out / "optuna.journal").exists():
            store = store or Store(out, name, maximize=True)
            statuses = Counter(s for s, _, _ in store.latest_by_key().values())
            if statuses["complete"] >= complete and statuses["running"] == running:
                break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert store is not None
    return {key: status for key, (status, _, _) in store.latest_by_key().items()}


def tiny_study(data: dict[str, Path], **sections: dict) -> dict:
    """A complete study on tiny:bert that trains in seconds; `sections` replace parts of it."""
    study = {
        "name": "tiny",
        "seed": 0,
        "model": {"source": "tiny:bert"},
        "task": {"kind": "classification", "train_file": str(data["train"]),
                 "test_file": str(data["test"]), "validation_size": 60},
        "train": {"steps": 12, "batch_size": 8, "seq_len": 24, "warmup_ratio": 0.1},
        "search": {"methods": ["lora", "full"], "ranks": [4], "lora_alpha": ["2r"],
                   "lr": [1e-3, 1e-2], "seeds": [0]},
    }
    for name, value in sections.items():
        study[name] = {**study[name], **value} if isinstance(value, dict) else value
    return study


def need_part(package: str) -> None:
    """Skip the test where a system part it needs is missing, with the line scripts/setup.sh
    prints for it; fail with that line instead where the part is required (.ci/run)."""
    reason = missing_reason(package)
    if reason is not None:
        if required(package):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def os_sandbox() -> None:
    """For tests of the sandbox itself: bubblewrap is a system part (above); where it is here
    but cannot contain anything (e.g. no user namespaces), the test is skipped saying why."""
    need_part("bubblewrap")
    if unavailable_reason() is not None:
        pytest.skip(f"no OS sandbox here: {unavailable_reason()}")


@pytest.fixture
def runnable(monkeypatch) -> None:
    """Where no OS sandbox works (bubblewrap missing, a container without namespaces), run
    samples behind the unsafe opt-in: for tests of assembly, scoring, data and the limits;
    tests/test_sandbox.py checks containment and the refusal."""
    if unavailable_reason() is not None:
        monkeypatch.setenv(UNSAFE_ENV, "1")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the module's own (skipped where PostgreSQL is not installed,
    failed instead where the part is required, as in .ci/run)."""
    from .postgres_server import PostgresServer

    need_part("postgresql")
    server = PostgresServer(postgres_bindir())
    server.start()
    yield server
    server.remove()


@pytest.fixture
def study_file(tmp_path: Path, data_files: dict[str, Path]):
    """Write a tiny study (with optional section overrides) and return its path."""

    def write(**sections: dict) -> Path:
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(tiny_study(data_files, **sections)))
        return path

    return write


def pytest_collection_modifyitems(items: list) -> None:
    """tests/test_threads.py's rerun of the numerics tests is the longest test by far: first,
    so that under `-n 2` the other process runs the rest beside it instead of after it."""
    items.sort(key=lambda item: getattr(item.module, "__name__", "") != "tests.test_threads")


def wait_until(what: str, check, timeout: float = 60):
    """check()'s first true value, polled every 0.2 s; a test failure naming `what` after
    `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
