"""Recipe axes: cells and groups over several axes, nested training subsets, power-law fits."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lorasweep.analysis.recipe import REFERENCES, fit_power_law, fit_recipe_axes
from lorasweep.cli import main
from lorasweep.config import validate_study
from lorasweep.methods import get_method
from lorasweep.recipe import parse_recipe, recipe_text, resolve_training
from lorasweep.report import write_report
from lorasweep.space import TrialSpec, cells_of, expand_trials, matched_rank
from lorasweep.workbench import load_workbench

from .conftest import tiny_study, trial_records, write_jsonl


def study_with(data_files, recipe: dict, **search) -> dict:
    raw = tiny_study(data_files, search={"methods": ["lora", "full"], "lr": [1e-3, 1e-2],
                                         "seeds": [0, 1], "recipe": recipe, **search})
    if "target_modules" in recipe:
        raw["search"].pop("target_modules", None)
    return raw


def test_cells_and_groups_over_several_axes(data_files):
    recipe = {"batch_size": [4, 8], "seq_len": [16, 24], "weight_decay": [0, 0.1],
              "target_modules": ["attention", ["query", "value"]]}
    study = validate_study(study_with(data_files, recipe), "test")
    cells = [cell for cell, _ in cells_of(study)]
    lora = [c for c in cells if c.method == "lora"]
    full = [c for c in cells if c.method == "full"]
    assert len(lora) == 2 * 2 * 2 * 2 and len(full) == 2 * 2 * 2  # full has no target modules
    assert len({c.key for c in cells}) == len(cells)
    assert {c.target_modules for c in lora} == {"attention", "query,value"}
    assert lora[0].recipe == "batch_size=4;seq_len=16;weight_decay=0"
    assert parse_recipe(lora[0].recipe) == {"batch_size": 4, "seq_len": 16, "weight_decay": 0}
    trials = expand_trials(study)
    assert len(trials) == len(cells) * 2 * 2
    # one group per cell and seed: the LRs of a cell and seed fuse, nothing else does
    groups: dict[str, set] = {}
    for trial in trials:
        groups.setdefault(trial.group_key, set()).add((trial.cell, trial.seed))
    assert len(groups) == len(cells) * 2 and all(len(g) == 1 for g in groups.values())
    # the store round trip keeps the recipe
    assert all(TrialSpec.from_attrs(t.to_attrs()) == t for t in trials)


def test_a_cell_without_recipe_axes_keeps_its_key_and_old_attrs_load(data_files):
    study = validate_study(tiny_study(data_files), "test")
    keys = [t.key for t in expand_trials(study)]
    assert keys[0] == "lora|r=4|alpha=2r|kaiming|all-linear|lr=0.001|seed=0"
    assert keys[-1] == "full|lr=0.01|seed=0"
    trial = expand_trials(study)[0]
    old_attrs = {k: v for k, v in trial.to_attrs().items() if k != "recipe"}  # stored before
    assert TrialSpec.from_attrs(old_attrs) == trial


def test_the_trial_recipe_is_the_train_section_with_the_cell_values():
    study = validate_study({**tiny_study({"train": "a", "test": "b"}), "search": {
        "methods": ["lora"], "lr": [1e-3], "recipe": {"epochs": [1, 2.5], "batch_size": [4]}}},
        "test")
    texts = [cell.recipe for cell, _ in cells_of(study)]
    assert texts == ["batch_size=4;epochs=1", "batch_size=4;epochs=2.5"]
    training = resolve_training(study.train, texts[1])
    assert training.train.steps is None and training.train.epochs == 2.5
    assert training.train.batch_size == 4 and training.train.seq_len == study.train.seq_len
    assert resolve_training(study.train, None).train == study.train
    values = {"grad_clip": None, "schedule": "linear", "warmup_ratio": 0.03, "adam_eps": 1e-10}
    assert parse_recipe(recipe_text(values)) == values


BAD_RECIPES = [
    ({"batch_size": [16, 0]}, "batch_size 0"),
    ({"batch_size": ["sixteen"]}, "batch_size 'sixteen'"),
    ({"batch_size": [8, 8]}, "listed twice"),
    ({"batch_size": []}, "search.recipe.batch_size"),
    ({"learning_rate": [1e-3]}, "'learning_rate' cannot be swept; allowed:"),
    ({"schedule": ["exponential"]}, "schedule 'exponential'"),
    ({"warmup_ratio": [1.5]}, "warmup_ratio 1.5"),
    ({"train_examples": [2.5]}, "train_examples 2.5"),
    ({"train_examples": [100000]}, "search.recipe.train_examples: 100000 is more than the 180"),
    ({"steps": [5], "epochs": [1]}, "steps or epochs, not both"),
    ({"target_modules": ["everything"]}, "target_modules 'everything' is not a preset"),
    ({"batch_size": [4]}, "search.match_params: needs two or more target sets"),
]


@pytest.mark.parametrize(("recipe", "expected"), BAD_RECIPES)
def test_bad_recipe_axis_is_one_line_exit_2(tmp_path: Path, data_files, capsys, recipe,
                                            expected):
    raw = study_with(data_files, recipe, match_params="match" in expected)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_training_subsets_are_nested_and_apart_from_validation(tmp_path: Path):
    # Unique texts, so examples can be told apart after tokenization.
    records = [{"text": f"example number {i} of the set", "label": "ab"[i % 2]} for i in range(90)]
    data = {"train": write_jsonl(tmp_path / "train.jsonl", records),
            "test": write_jsonl(tmp_path / "test.jsonl", records[:10])}
    raw = tiny_study(data, task={"validation_size": 20},
                     search={"methods": ["lora"], "lr": [1e-3],
                             "recipe": {"train_examples": [10, 30, 70], "seq_len": [12, 16]}})
    bench = load_workbench(validate_study(raw, "test"))
    study = validate_study(raw, "test")
    subsets = {}
    for text in {cell.recipe for cell, _ in cells_of(study)}:
        training = resolve_training(study.train, text)
        subsets[(training.train_examples, training.train.seq_len)] = bench.task_for(training)
    for seq_len in (12, 16):
        small, middle, large = (subsets[(n, seq_len)] for n in (10, 30, 70))
        assert [len(t.train) for t in (small, middle, large)] == [10, 30, 70]
        assert large.train.input_ids.shape[1] == seq_len
        assert torch_equal(middle.train.input_ids[:10], small.train.input_ids)
        assert torch_equal(large.train.input_ids[:30], middle.train.input_ids)
        validation = {tuple(row.tolist()) for row in large.validation.input_ids}
        assert len(validation) == 20
        assert not validation & {tuple(row.tolist()) for row in large.train.input_ids}
    # the same examples at both lengths, in the same order
    short, long = subsets[(30, 12)], subsets[(30, 16)]
    assert torch_equal(short.train.labels, long.train.labels)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_sweep_over_batch_size_and_data_size_trains_each_recipe(tmp_path: Path, data_files):
    raw = tiny_study(data_files, train={"steps": None, "epochs": 1, "seq_len": 16},
                     search={"methods": ["lora"], "lr": [1e-2], "ranks": [2],
                             "recipe": {"batch_size": [4, 8], "train_examples": [40, 80]}})
    raw["train"].pop("steps")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    with open(out / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["status"] for r in rows} == {"complete"}
    # one epoch: the step count is the subset size over the batch size
    steps = {r["recipe"]: int(r["steps"]) for r in rows}
    assert steps == {"batch_size=4;train_examples=40": 10, "batch_size=4;train_examples=80": 20,
                     "batch_size=8;train_examples=40": 5, "batch_size=8;train_examples=80": 10}
    with open(out / "optima.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4


def synthetic_rows(exponents: dict[str, float], axes: dict[str, list], seeds=(0, 1, 2),
                   noise: float = 0.0) -> list[dict]:
    """Rows whose optimal LR is 1e-3 * prod (value / first value)^k exactly (a parabola in
    log-LR peaked there), with a per-seed shift of the peak when noise > 0."""
    rng = np.random.default_rng(0)
    grid = [10 ** (-4.5 + i / 4) for i in range(14)]
    rows = []
    for combo in np.array(np.meshgrid(*axes.values())).T.reshape(-1, len(axes)):
        values = dict(zip(axes, (int(v) for v in combo), strict=True))
        log_star = -3 + sum(k * math.log10(values[a] / axes[a][0]) for a, k in exponents.items())
        for seed in seeds:
            shift = rng.normal(0, noise)
            for lr in grid:
                rows.append({"method": "lora", "rank": 8, "lora_alpha": 8.0,
                             "alpha_mode": "per_rank", "init": "kaiming",
                             "target_modules": "all-linear", "recipe": recipe_text(values),
                             "lr": lr, "seed": seed, "status": "complete",
                             "metric": 0.9 - 0.1 * (math.log10(lr) - log_star - shift) ** 2})
    return rows


def test_power_law_fit_recovers_a_known_exponent():
    rows = synthetic_rows({"batch_size": 0.7}, {"batch_size": [8, 16, 32, 64]})
    (fit,) = fit_recipe_axes(trial_records(rows), maximize=True)
    assert fit.axis == "batch_size" and fit.values == [8, 16, 32, 64]
    assert fit.exponent == pytest.approx(0.7, abs=1e-6)
    assert fit.predict(8) == pytest.approx(1e-3, rel=1e-5)
    assert fit.transfer(2e-3, 16, 64) == pytest.approx(2e-3 * 4 ** 0.7)
    # identical seeds: every bootstrap draw gives the same exponent
    assert fit.interval == "bootstrap over seeds"
    assert fit.low == pytest.approx(0.7, abs=1e-6) and fit.high == pytest.approx(0.7, abs=1e-6)
    assert REFERENCES["batch_size"]["LRM v2"] == pytest.approx(0.82, abs=0.005)
    assert fit_power_law(np.array([1.0, 10.0]), np.array([2.0, 0.2])) == pytest.approx((-1, 2))


def test_two_axes_give_one_series_per_value_of_the_other():
    axes = {"batch_size": [8, 32, 128], "train_examples": [500, 2000, 8000]}
    rows = synthetic_rows({"batch_size": 0.5, "train_examples": -0.25}, axes, noise=0.03)
    fits = fit_recipe_axes(trial_records(rows), maximize=True, samples=300)
    assert sorted((f.axis, parse_recipe(f.series.recipe)[other]) for f, other in
                  zip(fits, ["train_examples" if f.axis == "batch_size" else "batch_size"
                             for f in fits], strict=True)) == \
        [("batch_size", 500), ("batch_size", 2000), ("batch_size", 8000),
         ("train_examples", 8), ("train_examples", 32), ("train_examples", 128)]
    for fit in fits:
        truth = 0.5 if fit.axis == "batch_size" else -0.25
        assert fit.exponent == pytest.approx(truth, abs=0.06)
        assert fit.low < truth < fit.high and fit.high - fit.low < 0.3


def test_series_keep_the_order_the_report_always_gave():
    """Series are listed by the text of what they share (rank 16 before rank 4), as before the
    cells were typed: a report regenerated from an earlier folder lists them as it did."""
    rows = synthetic_rows({"batch_size": 0.5}, {"batch_size": [8, 32]}, seeds=(0,))
    rows = [{**r, "rank": rank, "lora_alpha": 2.0 * rank} for rank in (4, 16) for r in rows]
    fits = fit_recipe_axes(trial_records(rows), maximize=True)
    assert [f.series.rank for f in fits] == [16, 4]


def test_one_seed_gives_the_t_interval_and_two_values_none():
    rows = synthetic_rows({"batch_size": 1.0}, {"batch_size": [8, 16, 32]}, seeds=(0,))
    rows = [r for r in rows if not (r["recipe"] == "batch_size=32" and r["lr"] > 0.01)]
    (fit,) = fit_recipe_axes(trial_records(rows), maximize=True)
    assert fit.interval == "t" and fit.low <= fit.exponent <= fit.high
    two = [r for r in rows if r["recipe"] != "batch_size=32"]
    (fit,) = fit_recipe_axes(trial_records(two), maximize=True)
    assert fit.low is None and fit.interval == "" and fit.exponent == pytest.approx(1.0, abs=1e-6)


def test_report_prints_the_fit_beside_sqrt_b_and_b(tmp_path: Path):
    rows = synthetic_rows({"batch_size": 0.7}, {"batch_size": [8, 16, 32, 64]})
    write_report(tmp_path, trial_records(rows), "accuracy", True, "batch")
    text = (tmp_path / "report.md").read_text()
    assert "## Optimal LR against batch_size" in text
    assert "| cells | batch_size | k | interval | sqrt(B) | B | LRM v2 |" in text
    assert "| lora r=8 a=1r | 8 16 32 64 | +0.700 |" in text
    assert "+0.50 | +1.00 | +0.82 |" in text
    assert (tmp_path / "lr_star_vs_batch_size.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "optima.csv") as handle:
        assert [r["recipe"] for r in csv.DictReader(handle)] == [
            "batch_size=8", "batch_size=16", "batch_size=32", "batch_size=64"]


def test_matched_parameter_counts_scale_the_rank(data_files):
    assert matched_rank(8, 300, 100) == 24 and matched_rank(1, 100, 1000) == 1
    raw = study_with(data_files, {"target_modules": ["all-linear", "attention", ["query"]]},
                     match_params=True, ranks=[4, 8])
    study = validate_study(raw, "test")
    widths = {"all-linear": 1200, "attention": 400, "query": 100}
    ranks = {(c.target_modules, c.rank) for c, _ in cells_of(study, widths) if c.is_adapter}
    assert ranks == {("all-linear", 4), ("all-linear", 8), ("attention", 12),
                     ("attention", 24), ("query", 48), ("query", 96)}
    bench = load_workbench(study)
    counts: dict[int, dict[str, int]] = {}  # reference rank -> target set -> adapter params
    adapters = [c for c, _ in cells_of(study, bench.widths) if c.is_adapter]
    for cell, reference in zip(adapters, [4, 8] * 3, strict=True):
        attached = get_method("lora").attach(copy.deepcopy(bench.base), cell, 1,
                                             torch.Generator().manual_seed(0))
        counts.setdefault(reference, {})[cell.target_modules] = attached.trainable_count
    for reference, by_target in counts.items():
        # the same count as the reference set, to within half a rank's worth of the other set
        for target, count in by_target.items():
            assert abs(count - by_target["all-linear"]) <= bench.widths[target] / 2, (reference,
                                                                                      target)


def test_report_sets_target_modules_side_by_side_with_their_parameter_counts(tmp_path: Path):
    rows = []
    for target, rank, count in (("all-linear", 8, 1000), ("attention", 24, 1008)):
        for row in synthetic_rows({}, {"batch_size": [8]}, seeds=(0,)):
            rows.append({**row, "target_modules": target, "rank": rank, "lora_alpha": float(rank),
                         "trainable_params": count})
    write_report(tmp_path, trial_records(rows), "accuracy", True, "targets")
    text = (tmp_path / "report.md").read_text()
    assert "## Target modules compared" in text
    assert "| lora r=24 a=1r attention batch_size=8 | attention | 1008 |" in text


def test_suggest_moves_the_lr_along_the_fitted_batch_size_exponent(tmp_path: Path, data_files,
                                                                   capsys):
    """`suggest --batch-size 256` from a study that swept 8..64: the measured optimum at 64
    moved by (256/64)^0.7; a study without the axis gives one line."""
    rows = synthetic_rows({"batch_size": 0.7}, {"batch_size": [8, 16, 32, 64]})
    with open(tmp_path / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(tiny_study(data_files)))
    assert main(["suggest", "--from", str(tmp_path), "--batch-size", "256",
                 "--out", str(tmp_path / "s.json")]) == 0
    (suggestion,) = json.loads((tmp_path / "s.json").read_text())["suggestions"]
    expected = 1e-3 * 8 ** 0.7 * 4 ** 0.7
    assert suggestion["lr"] == pytest.approx(expected, rel=1e-4)
    assert suggestion["lr_interval"] == pytest.approx([expected, expected], rel=1e-4)
    assert "k = +0.70" in capsys.readouterr().out
    assert main(["suggest", "--from", str(tmp_path), "--train-examples", "500"]) == 2
    assert "no fit of lr_star against train_examples" in capsys.readouterr().err
