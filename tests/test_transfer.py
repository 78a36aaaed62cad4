"""LR transfer: the rules against the published muA table, predictions on synthetic studies with
known scaling, `lorasweep suggest`, and the transfer-first search's brackets."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from lorasweep.analysis.optima import Optimum, find_optima
from lorasweep.analysis.scaling import (
    fit_rank_scaling,
    pooled_slope,
    predicted_width_exponent,
)
from lorasweep.analysis.transfer import (
    Target,
    check_rules,
    families,
    grid_steps,
    predict,
    score_rules,
)
from lorasweep.cli import main
from lorasweep.config import validate_study
from lorasweep.errors import StudyError
from lorasweep.records import COLUMNS, read_trials_csv
from lorasweep.report import write_report
from lorasweep.space import Cell, expand_trials
from lorasweep.study.plan import bracket, plan_trials, replay_search, widened
from lorasweep.study.rungs import Outcome

from .conftest import trial_records

GRID = [10 ** (-4 + i / 4) for i in range(13)]  # 1e-4 .. 1e-1, four points per decade
STEP = 0.25


def cell(rank, method="lora", alpha="2r", init="kaiming") -> dict:
    per_rank = alpha.endswith("r")
    return {"method": method, "rank": rank,
            "lora_alpha": float(alpha[:-1] or 1) * rank if per_rank else float(alpha),
            "alpha_mode": "per_rank" if per_rank else "constant", "init": init,
            "target_modules": "all-linear"}


FULL = {"method": "full", "rank": None, "lora_alpha": None, "alpha_mode": None, "init": None,
        "target_modules": None}


def curve(fields: dict, lr_star: float, grid=GRID) -> list[dict]:
    """A cell's trials, the metric peaking at lr_star (a parabola in log-LR: exact refinement)."""
    return [{**fields, "lr": lr, "seed": 0, "status": "complete",
             "metric": 0.9 - 0.1 * (math.log10(lr / lr_star)) ** 2} for lr in grid]


def optimum(fields: dict, lr_star: float) -> Optimum:
    return Optimum(cell=Cell.from_row(fields), lr_best=lr_star, lr_star=lr_star, lr_star_low=None,
                   lr_star_high=None, peak=0.9, peak_std=None, n_seeds=1, edge="", suggest=[],
                   n_lrs=13, diverged=0)


def family_of(*optima: Optimum):
    (family,) = families(list(optima), {o.cell: STEP for o in optima})
    return family


# The muA paper's table (DESIGN.md section 3): (method, lora_alpha, init) -> exponents of eta* in
# rank and width. lora_alpha = r is alpha = 1 in muA's terms, a constant lora_alpha is alpha = 1/r.
PUBLISHED = [("lora", "1r", "mua_a", -0.5, -0.5), ("lora", "2r", "kaiming", -0.5, -0.5),
             ("lora", "16", "mua_a", 0.0, -0.5), ("lora", "16", "kaiming", 0.0, -0.5),
             ("lora", "1r", "mua_b", 0.0, -1.0), ("rslora", "16", "kaiming", -0.25, -0.5),
             ("rslora", "2r", "kaiming", -0.75, -0.5), ("loraplus", "2r", "kaiming", -0.5, -0.5)]


@pytest.mark.parametrize(("method", "alpha", "init", "beta", "omega"), PUBLISHED)
def test_mua_rule_applies_the_published_exponents(method, alpha, init, beta, omega):
    source = optimum(cell(16, method, alpha, init), 2e-3)
    assert predicted_width_exponent(source.cell) == omega
    (prediction,) = [p for p in predict(family_of(source), Target(rank=256, width_ratio=4.0), {})
                     if p.rule == "muA"]
    assert prediction.lr == pytest.approx(2e-3 * 16 ** beta * 4 ** omega, rel=1e-12)
    assert prediction.target.rank == 256
    assert prediction.target.alpha == source.cell.alpha / 16 * 256 \
        if alpha.endswith("r") else float(alpha)


def test_no_mua_rule_where_the_paper_gives_none():
    for fields in (cell(8, init="gaussian"), cell(8, "pissa", init="pissa"), cell(8, "dora")):
        rules = {p.rule for p in predict(family_of(optimum(fields, 1e-3)), Target(rank=32), {})}
        assert "muA" not in rules


def test_full_fine_tuning_rules():
    init_b = family_of(optimum(cell(8, alpha="1r", init="mua_b"), 3e-3),
                       optimum(cell(32, alpha="1r", init="mua_b"), 3e-3))
    (same,) = predict(init_b, Target(full=True), {})
    assert same.rule == "muA-init-b" and same.lr == pytest.approx(3e-3)  # transfers unchanged
    (wider,) = predict(init_b, Target(full=True, width_ratio=2.0), {})
    assert wider.lr == pytest.approx(1.5e-3)  # full fine-tuning ~ n^-1
    (ten,) = predict(family_of(optimum(cell(8, alpha="16"), 2e-3)), Target(full=True), {})
    assert ten.rule == "lora-10x" and ten.lr == pytest.approx(2e-4)
    assert ten.target == Cell("full")
    # width changes are muA's to predict, not the rule of thumb's
    assert predict(family_of(optimum(cell(8, alpha="16"), 2e-3)),
                   Target(full=True, width_ratio=2.0), {}) == []


def synthetic(beta: float, base: float, alpha="2r", ranks=(4, 8, 16, 32, 64)) -> list[dict]:
    rows = []
    for rank in ranks:
        rows += curve(cell(rank, alpha=alpha), base * (rank / 16) ** beta)
    return rows


def test_leave_one_rank_out_on_a_study_that_scales_as_mua_says():
    rows = synthetic(-0.5, 3e-3) + synthetic(0.0, 2e-3, alpha="16") + curve(FULL, 2e-4)
    optima = find_optima(trial_records(rows), maximize=True)
    checks = check_rules([(optima, grid_steps(trial_records(rows)))])
    scores = {s.rule: s for s in score_rules(checks)}
    assert scores["muA"].n == 10 and scores["muA"].max_abs < 1e-6
    assert scores["fitted"].max_abs < 1e-6
    # the 10x rule: exact from the constant-alpha family; the 2r family's mean LR is 3e-3
    tens = {c.cell: c.error_steps for c in checks if c.rule == "lora-10x"}
    assert tens["full from lora a=16"] == pytest.approx(0, abs=1e-6)
    assert tens["full from lora a=2r"] == pytest.approx(math.log10(3e-4 / 2e-4) / STEP, rel=1e-6)


def test_fitted_rule_beats_mua_where_the_study_departs_from_it():
    rows = synthetic(-0.3, 3e-3)  # muA says -0.5
    optima = find_optima(trial_records(rows), maximize=True)
    steps = grid_steps(trial_records(rows))
    scores = {s.rule: s for s in score_rules(check_rules([(optima, steps)]))}
    assert scores["fitted"].max_abs < 1e-6
    # holding out rank 4 (or 64), muA's slope is off by 0.2 over the distance (log10) from the
    # mean rank of the others
    distance = math.log10(4) - sum(math.log10(r) for r in (8, 16, 32, 64)) / 4
    assert scores["muA"].max_abs == pytest.approx(0.2 * abs(distance) / STEP, rel=1e-6)


def test_one_exponent_pooled_over_studies_with_their_own_intercepts():
    small = find_optima(trial_records(synthetic(-0.4, 1e-2, ranks=(4, 8))), maximize=True)
    large = find_optima(trial_records(synthetic(-0.4, 1e-3, ranks=(32, 64))), maximize=True)
    (fit,) = fit_rank_scaling(small, large)
    assert fit.beta == pytest.approx(-0.4, abs=1e-9)
    assert set(fit.intercepts) == {0, 1}
    # one line through both studies' optima would mistake their LR levels for a steep slope
    (naive,) = fit_rank_scaling(small + large)
    assert naive.beta < -0.9


def test_pooled_slope_is_ordinary_least_squares_for_one_study():
    rng = np.random.default_rng(0)
    x = np.log10([2, 4, 8, 16, 32, 64])
    y = -2 - 0.4 * x + rng.normal(0, 0.05, len(x))
    slope, stderr, dof, intercepts = pooled_slope(x, y, np.zeros(len(x), int))
    reference = stats.linregress(x, y)
    assert slope == pytest.approx(reference.slope, rel=1e-12)
    assert stderr == pytest.approx(reference.stderr, rel=1e-9)
    assert dof == len(x) - 2 and intercepts[0] == pytest.approx(reference.intercept, rel=1e-12)


def write_study(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    trials = [{"trial": i, **row} for i, row in enumerate(rows)]
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in t.items()} for t in trials)
    write_report(folder, trial_records(rows), "accuracy", True, "synthetic")
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished study folder (optima.csv, trials.csv, report) scaling as muA says."""
    return write_study(tmp_path_factory.mktemp("finished") / "study",
                       synthetic(-0.5, 3e-3, ranks=(4, 16)))


def test_suggest_prints_and_writes_settings(tmp_path, capsys, finished):
    folder = finished
    out = tmp_path / "lora.yaml"
    assert main(["suggest", "--from", str(folder), "--rank", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank 64" in printed and "* lora a=2r" in printed and "muA" in printed
    (doc,) = yaml.safe_load(out.read_text())["suggestions"]
    assert doc["rule"] == "muA" and doc["lr"] == pytest.approx(1.5e-3, rel=1e-2)
    assert doc["lr_interval"][0] < doc["lr"] < doc["lr_interval"][1]
    from peft import LoraConfig

    config = LoraConfig(**doc["peft_config"])
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (64, 128, True)
    assert doc["optimizer"]["name"] == "AdamW" and doc["optimizer"]["lr"] == doc["lr"]
    as_json = tmp_path / "lora.json"
    assert main(["suggest", "--from", str(folder), "--to", "full", "--out", str(as_json)]) == 0
    (full,) = json.loads(as_json.read_text())["suggestions"]
    assert full["rule"] == "lora-10x" and "peft_config" not in full
    assert main(["suggest", "--check", str(folder)]) == 0
    assert "leave one rank out" in capsys.readouterr().out


def test_suggest_fits_over_several_studies_and_uses_the_better_rule(tmp_path, capsys):
    """Two studies that both scale as r^-0.3 (muA says -0.5 for lora_alpha = 2r): the fitted
    rule predicts their held-out ranks exactly, so the suggestion uses it."""
    first = write_study(tmp_path / "a", synthetic(-0.3, 3e-3, ranks=(4, 8, 16)))
    second = write_study(tmp_path / "b", synthetic(-0.3, 1e-3, ranks=(16, 32, 64)))
    out = tmp_path / "s.json"
    assert main(["suggest", "--from", str(first), "--from", str(second), "--rank", "128",
                 "--out", str(out)]) == 0
    (doc,) = json.loads(out.read_text())["suggestions"]
    assert doc["rule"] == "fitted"
    assert doc["lr"] == pytest.approx(3e-3 * (128 / 16) ** -0.3, rel=1e-2)
    assert "r^-0.30" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--rank", "0"], "--rank 0: must be at least 1"),
    ([], "give --rank R, --to full, --batch-size B or --train-examples N"),
    (["--rank", "8", "--method", "dora"], "no adapter cells match"),
    (["--rank", "8", "--out", "x.txt"], "name a .yaml, .yml or .json file"),
    (["--rank", "8", "--width", "64"], "give --source-width"),
])
def test_suggest_bad_input_is_one_line(capsys, finished, args, message):
    assert main(["suggest", "--from", str(finished), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_suggest_needs_a_finished_study_with_optima(tmp_path, capsys):
    assert main(["suggest", "--from", str(tmp_path), "--rank", "8"]) == 2
    assert "no optima.csv" in capsys.readouterr().err
    flat = [{**r, "metric": 0.5} for r in synthetic(-0.5, 3e-3, ranks=(4, 16))]
    folder = write_study(tmp_path / "flat", flat)
    assert main(["suggest", "--from", str(folder), "--rank", "8"]) == 2
    assert "no cell has a usable optimum" in capsys.readouterr().err


def test_bracket_and_its_widening_at_the_edges():
    lrs = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert bracket(lrs, 4.4, 3) == [2.0, 4.0, 8.0]
    assert bracket(lrs, 0.1, 3) == [1.0, 2.0, 4.0]  # shifted inside the grid
    assert bracket(lrs, 100.0, 3) == [8.0, 16.0, 32.0]
    assert bracket(lrs, 5.0, 2) == [4.0, 8.0]
    assert widened(lrs, [2.0, 4.0, 8.0], "low") == [1.0, 2.0, 4.0, 8.0]
    assert widened(lrs, [2.0, 4.0, 8.0], "high") == [2.0, 4.0, 8.0, 16.0]
    assert widened(lrs, [1.0, 2.0, 4.0], "low") == [1.0, 2.0, 4.0]  # the grid ends there
    assert widened(lrs, [2.0, 4.0, 8.0], "") == [2.0, 4.0, 8.0]


SEARCH = {"name": "s", "model": {"source": "tiny:bert"},
          "task": {"kind": "classification", "dataset": "unused"}, "train": {"steps": 1},
          "search": {"methods": ["lora", {"name": "full", "lr": GRID}], "ranks": [4, 16, 64],
                     "lora_alpha": ["2r"], "lr": GRID, "strategy": "transfer"}}


def outcomes_for(study, star) -> dict:
    """Every grid trial's outcome, its metric peaking at star(cell)."""
    return {t.key: Outcome("complete", 0.9 - 0.1 * math.log10(t.lr / star(t.cell)) ** 2)
            for t in expand_trials(study)}


def test_transfer_search_runs_the_reference_first_then_brackets():
    study = validate_study(SEARCH, "s")
    assert {t.cell.rank for t in plan_trials(study, {}, True)} == {16}  # the middle rank
    recorded = outcomes_for(study, lambda c: 1e-3 * (c.rank / 16) ** -0.5 if c.rank else 1e-4)
    ran = replay_search(study, recorded, True)
    by_cell: dict = {}
    for key in ran:
        name = key.split("|")[1] if key.startswith("lora") else "full"
        by_cell[name] = by_cell.get(name, 0) + 1
    # the reference over the whole grid; 3 LRs around muA's (exact) prediction for the other
    # ranks, and around the 10x rule's (exact) prediction for full fine-tuning
    assert by_cell == {"r=16": 13, "r=4": 3, "r=64": 3, "full": 3}


def test_transfer_search_widens_until_the_optimum_is_inside():
    study = validate_study(SEARCH, "s")
    # rank 4's optimum sits 3 grid steps above muA's prediction (beta -0.5 from rank 16)
    truth = {16: 1e-3, 4: 2e-3 * 10 ** (3 * STEP), 64: 5e-4, None: 1e-4}
    recorded = outcomes_for(study, lambda c: truth[c.rank])
    ran = replay_search(study, recorded, True)
    rank4 = sorted(float(k.split("lr=")[1].split("|")[0]) for k in ran if "|r=4|" in k)
    best = min(GRID, key=lambda lr: abs(math.log10(lr / truth[4])))
    assert rank4[0] < best < rank4[-1]  # the best grid LR ended up inside the run
    assert len(rank4) == 3 + 3  # the bracket, widened three times


def test_reference_rank_must_be_a_searched_rank():
    with pytest.raises(StudyError, match=r"reference_rank 8: not in search\.ranks"):
        validate_study({**SEARCH, "search": {**SEARCH["search"], "reference_rank": 8}}, "s")


def test_transfer_search_end_to_end(tmp_path, study_file):
    """`lorasweep run` adds the brackets once the reference has finished, and ends at the plan's
    fixpoint (a causal LM: its eval loss is never flat, so the brackets are really used)."""
    path = study_file(model={"source": "tiny:llama"},
                      task={"kind": "causal_lm", "validation_size": 16},
                      train={"steps": 3, "batch_size": 4, "seq_len": 16},
                      search={"methods": ["lora"], "ranks": [2, 8], "seeds": [0],
                              "lr": [1e-3, 1e-2, 1e-1, 1.0], "strategy": "transfer",
                              "reference_rank": 8, "bracket": 2})
    out = tmp_path / "study"
    assert main(["run", str(path), "--out", str(out)]) == 0
    records = read_trials_csv(out)
    ranks = [r.cell.rank for r in records]
    assert ranks.count(8) == 4 and 2 <= ranks.count(2) < 4
    assert {r.status for r in records} <= {"complete", "diverged"}
    # the runner ran exactly what the plan asks for, given what it ran: its fixpoint
    study = validate_study(yaml.safe_load((out / "study.yaml").read_text()), "s")
    outcomes = {t.key: Outcome(r.status, r.metric) for t in expand_trials(study) for r in records
                if (r.cell.rank, r.lr) == (t.cell.rank, t.lr)}
    assert {t.key for t in plan_trials(study, outcomes, False)} == set(outcomes)


def test_search_cost_benchmark_replays_the_shipped_studies(capsys, monkeypatch):
    """`benchmarks/search_cost.py` (once broken by a cell column it did not match) replays the
    transfer search on the shipped examples' full grids with the figures benchmarks/README.md
    records: every cell within one grid step, in 27 of 42 and 75 of 75 trials."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    importlib.import_module("search_cost").main(["--studies", "1", "--noise", "0.005",
                                                 "--stop-early", "none"])
    rows = [line.split(" | ")[1:5] for line in capsys.readouterr().out.splitlines()
            if "(real)" in line]
    assert rows == [["42", "27", "64%", "7/7 (100%)"], ["75", "75", "100%", "5/5 (100%)"]]
