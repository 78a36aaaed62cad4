"""Group sizes that fit the memory, out-of-memory groups split and retried, and the dry run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import lorasweep.study.runner as runner
from lorasweep.cli import main
from lorasweep.config import load_study
from lorasweep.recipe import resolve_training
from lorasweep.space import expand_trials
from lorasweep.train import train_group
from lorasweep.trainers.memory import (
    GroupSizes,
    PeakModel,
    free_memory,
    measure_peak,
    one_step,
    parse_memory,
    probe_peaks,
    train_fitting,
    without_evaluation,
)


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("text", "expected"), [
    ("40GiB", 40 * 2**30), ("500MB", 500 * 10**6), ("1.5 KiB", 1536), ("1024", 1024)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("flags", [["--memory-limit", "40XB"], ["--memory-limit", "lots"],
                                   ["--memory-limit", "0GiB"], ["--max-group", "0"],
                                   ["--max-group", "two"]])
def test_bad_memory_or_group_option_is_one_line(tmp_path: Path, study_file, capsys, flags):
    out = tmp_path / "out"
    assert main(["run", str(study_file()), "--out", str(out), "--dry-run", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flags[0] in err
    assert not out.exists()


def test_on_a_gpu_the_allocator_peak_and_the_free_memory_are_read(monkeypatch):
    """The CUDA readings, without CUDA: the calls are faked, their order and use checked."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 200)
    cuda = torch.device("cuda")
    assert measure_peak(lambda: events.append("run"), cuda) == 123
    assert events == ["sync", "reset", "run", "sync"]
    assert free_memory(cuda) == 1200  # free, plus what torch's allocator holds cached
    assert GroupSizes(cuda, None, None).budget() == 1080  # x 0.9 headroom
    assert GroupSizes(cuda, None, 500).budget() == 500


def test_largest_group_that_fits_is_linear_in_k():
    peaks = PeakModel(one=10, two=13)  # 10 at K = 1, 3 more per trial
    assert [peaks.at(k) for k in (1, 2, 4)] == [10, 13, 19]
    assert peaks.largest_fitting(budget=20, ceiling=8) == 4
    assert peaks.largest_fitting(budget=1000, ceiling=8) == 8
    assert peaks.largest_fitting(budget=5, ceiling=8) == 1  # nothing fits: one at a time
    assert PeakModel(one=10, two=None).largest_fitting(budget=1000, ceiling=8) == 1


def test_group_sizes_probe_once_per_cell_and_shrink():
    calls = []

    def probe():
        calls.append(1)
        return PeakModel(one=100, two=110)

    sizes = GroupSizes(torch.device("cpu"), max_group=None, memory_limit=135)
    assert sizes.size("a", True, probe) == 4 and sizes.size("a", True, probe) == 4
    assert len(calls) == 1
    sizes.shrink("a", 2)
    assert sizes.size("a", True, probe) == 2
    assert sizes.size("full", False, probe) == 1 and len(calls) == 1
    capped = GroupSizes(torch.device("cpu"), max_group=3, memory_limit=10**9)
    assert capped.size("a", True, probe) == 3  # a limit sizes automatically, --max-group caps
    fixed = GroupSizes(torch.device("cpu"), max_group=5, memory_limit=None)
    assert fixed.size("a", True, probe) == 5 and len(calls) == 2  # no limit: no probe


def test_a_step_measured_at_k_1_and_2_predicts_k_3(study_file):
    """On the CPU the probe counts live tensor bytes: the base copy, and per trial its adapter,
    gradients, AdamW state and activations, so K = 3 is predicted from K = 1 and 2."""
    study = load_study(study_file(search={"methods": ["lora"], "lr": [1e-3]}))
    bench = runner.load_workbench(study)
    trial = expand_trials(study)[0]
    training = resolve_training(study.train, trial.cell.recipe)
    task = without_evaluation(bench.task)
    device = torch.device("cpu")

    def peak(k):
        return measure_peak(lambda: train_group(bench.base, task, one_step(training.train),
                                                [trial] * k, device), device)

    model = PeakModel(peak(1), peak(2))
    base_bytes = sum(p.numel() * p.element_size() for p in bench.base.parameters())
    assert model.one > base_bytes and model.two > model.one
    assert peak(3) == pytest.approx(model.at(3), rel=0.05)


def test_a_probe_that_runs_out_of_memory_at_two_settles_on_one():
    def train(group):
        if len(group) > 1:
            raise torch.OutOfMemoryError("fake")
        return torch.zeros(1000)

    peaks = probe_peaks(train, "trial", True, torch.device("cpu"))
    assert peaks.two is None and peaks.one >= 4000
    assert peaks.largest_fitting(budget=10**12, ceiling=8) == 1


def test_out_of_memory_splits_in_halves_and_keeps_going():
    sizes_tried = []

    def train(group):
        sizes_tried.append(len(group))
        if len(group) > 2:
            raise torch.OutOfMemoryError("fake: more than 2 trials")
        return [t * 10 for t in group]

    shrunk = []
    done = list(train_fitting(train, list(range(7)), 8, shrunk.append))
    assert [r for _, results in done for r in results] == [t * 10 for t in range(7)]
    assert sizes_tried == [7, 4, 2, 2, 2, 1] and shrunk == [4, 2]
    with pytest.raises(torch.OutOfMemoryError):  # one trial that does not fit is a real failure
        list(train_fitting(lambda group: (_ for _ in ()).throw(torch.OutOfMemoryError()),
                           [1], 1))


def test_trials_lost_to_memory_are_recorded_with_the_numbers_of_single_runs(
        tmp_path: Path, study_file, monkeypatch):
    path = study_file(train={"steps": 4}, search={"methods": ["lora"], "lr": [1e-3, 3e-3, 1e-2]})
    assert main(["run", str(path), "--out", str(tmp_path / "alone"), "--max-group", "1"]) == 0
    real, sizes = runner.train_group, []

    def small_device(base, task, train, trials, device, *args, **options):
        sizes.append(len(trials))
        if len(trials) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake: more than 1 trial)")
        return real(base, task, train, trials, device, *args, **options)

    monkeypatch.setattr(runner, "train_group", small_device)
    assert main(["run", str(path), "--out", str(tmp_path / "split"), "--max-group", "3"]) == 0
    assert sizes == [3, 2, 1, 1, 1]
    split, alone = read_rows(tmp_path / "split"), read_rows(tmp_path / "alone")
    assert [r["status"] for r in split] == ["complete"] * 3
    for a, b in zip(split, alone, strict=True):
        for column in ("trial", "lr", "status", "train_loss", "eval_loss", "metric"):
            assert a[column] == b[column], column


def test_dry_run_prints_groups_and_peaks_and_writes_nothing(tmp_path: Path, study_file, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = study_file(search={"methods": ["lora", "full"], "lr": [1e-3, 3e-3, 1e-2]})
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(path), "--dry-run", "--max-group", "auto",
                 "--memory-limit", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "6 trials (the whole grid)" in out and "budget 1.00 GiB (--memory-limit)" in out
    assert "measured on cpu with one training step at K=1 and K=2" in out
    assert "K=3, lr 0.001, 0.003, 0.01: predicted peak" in out
    assert out.count("full seed 0: K=1") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lorasweep-studies/
    assert main(["run", str(path), "--dry-run", "--max-group", "auto",
                 "--memory-limit", "1KiB"]) == 0
    assert "over the budget even alone" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    existing = tmp_path / "existing"
    assert main(["run", str(path), "--out", str(existing), "--set", "train.steps=2"]) == 0
    listing = {p: p.stat().st_mtime_ns for p in existing.rglob("*")}
    assert main(["run", str(path), "--out", str(existing), "--dry-run"]) == 0
    assert "existing exists" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in existing.rglob("*")} == listing


def test_a_memory_limit_probes_k_1_and_2_then_fuses_what_fits(tmp_path: Path, study_file,
                                                             monkeypatch):
    path = study_file(train={"steps": 4}, search={"methods": ["lora"], "lr": [1e-3, 3e-3, 1e-2]})
    real, calls = runner.train_group, []

    def spy(base, task, train, trials, device, *args, **options):
        calls.append((len(trials), train.steps))
        return real(base, task, train, trials, device, *args, **options)

    monkeypatch.setattr(runner, "train_group", spy)
    out = tmp_path / "auto"
    assert main(["run", str(path), "--out", str(out), "--memory-limit", "1GiB"]) == 0
    assert calls == [(1, 1), (2, 1), (3, 4)]  # the two one-step probes, then one group of 3
    assert [r["status"] for r in read_rows(out)] == ["complete"] * 3
