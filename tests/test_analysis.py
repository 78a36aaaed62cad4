"""Optima and rank scaling recovered from synthetic trial tables with known answers."""

from __future__ import annotations

import math

import pytest

from lorasweep.analysis.optima import find_optima
from lorasweep.analysis.scaling import fit_rank_scaling, predicted_beta
from lorasweep.space import Cell

from .conftest import GRID, rows_for, trial_records


@pytest.mark.parametrize("maximize", [True, False])
def test_parabola_recovers_an_optimum_between_grid_points(maximize):
    (optimum,) = find_optima(trial_records(rows_for(3.3e-3, maximize=maximize)), maximize=maximize)
    assert optimum.lr_star == pytest.approx(3.3e-3, rel=1e-6)
    assert optimum.lr_best == pytest.approx(10 ** -2.5)  # the grid point nearest 3.3e-3
    assert optimum.edge == "" and optimum.suggest == []
    assert optimum.n_seeds == 1 and optimum.lr_star_low is None and optimum.peak_std is None


def test_bootstrap_interval_over_seeds_covers_the_truth():
    rows = rows_for(2e-3, seeds=range(5), noise=0.01)
    for row in rows:  # seed-dependent jitter in the position of the peak
        row["metric"] += 0.002 * ((row["seed"] % 3) - 1) * math.log10(row["lr"])
    (optimum,) = find_optima(trial_records(rows), maximize=True)
    assert optimum.n_seeds == 5 and optimum.peak_std > 0
    assert optimum.lr_star_low <= 2e-3 <= optimum.lr_star_high
    assert optimum.lr_star_low < optimum.lr_star < optimum.lr_star_high
    assert optimum.lr_star_high / optimum.lr_star_low < 10 ** 0.5


def test_edge_of_grid_is_flagged_with_lrs_to_add():
    (high,) = find_optima(trial_records(rows_for(1.0)), maximize=True)
    assert high.edge == "high" and high.lr_best == pytest.approx(0.1)
    assert high.suggest == pytest.approx([0.178, 0.316], rel=1e-2)
    (low,) = find_optima(trial_records(rows_for(1e-6)), maximize=True)
    assert low.edge == "low" and low.suggest[0] < 1e-4


def test_diverged_trials_bound_the_grid_and_are_counted():
    rows = rows_for(1.0, diverge_above=0.02)
    (optimum,) = find_optima(trial_records(rows), maximize=True)
    assert optimum.diverged == 3 and optimum.n_lrs == 13
    # the best finished LR is not the grid's edge: larger LRs were tried and diverged
    assert optimum.edge == "" and optimum.lr_best == pytest.approx(10 ** -1.75)


def test_missing_trials_and_cells_without_results():
    rows = [r for r in rows_for(3e-3) if r["lr"] != GRID[6]]
    rows += [{**rows_for(3e-3, rank=4)[0], "status": "failed", "metric": None}]
    optima = find_optima(trial_records(rows), maximize=True)
    assert len(optima) == 1 and optima[0].n_lrs == 12


def test_a_stopped_neighbour_of_the_best_leaves_it_unrefined_and_one_lr_is_no_edge():
    """search.stop_early's pruned trials are on the grid without a value: a best LR whose grid
    neighbour stopped has edge 'stopped' and lr_star = lr_best; a cell of one LR (no neighbours,
    an IndexError in every one-LR study once) has no edge."""
    rows = rows_for(3.3e-3)
    for row in rows:
        if row["lr"] > 10 ** -2.5:
            row.update(status="pruned", metric=None)
    (optimum,) = find_optima(trial_records(rows), maximize=True)
    assert optimum.edge == "stopped" and optimum.lr_star == optimum.lr_best == \
        pytest.approx(10 ** -2.5) and optimum.n_lrs == len(GRID) and optimum.suggest == []
    (one,) = find_optima(trial_records([r for r in rows_for(3.3e-3) if r["lr"] == GRID[5]]),
                         maximize=True)
    assert one.edge == "" and one.n_lrs == 1


@pytest.mark.parametrize(("beta", "mode"), [(-0.5, "per_rank"), (0.0, "constant")])
def test_rank_scaling_fit_recovers_the_exponent(beta, mode):
    rows = []
    for rank in (4, 8, 16, 32, 64):
        rows += rows_for(1e-2 * rank ** beta, seeds=range(2), rank=rank, alpha_mode=mode)
    (fit,) = fit_rank_scaling(find_optima(trial_records(rows), maximize=True))
    assert fit.ranks == [4, 8, 16, 32, 64]
    assert fit.beta == pytest.approx(beta, abs=1e-6)
    assert fit.predicted == beta  # what muA predicts for kaiming LoRA in this alpha mode
    assert fit.beta_low - 1e-9 <= beta <= fit.beta_high + 1e-9  # exact data: a zero-width interval


def test_muA_table():
    def beta(method, alpha, init):
        return predicted_beta(Cell(method, rank=8, lora_alpha=alpha, init=init))
    assert beta("lora", "2r", "kaiming") == -0.5
    assert beta("lora", "16", "mua_a") == 0.0
    assert beta("rslora", "16", "kaiming") == -0.25
    assert beta("rslora", "2r", "kaiming") == -0.75
    assert beta("lora", "2r", "gaussian") is None  # A's scale depends on r
    assert beta("lora", "1r", "mua_b") == 0.0
    assert beta("pissa", "2r", "pissa") is None
    assert predicted_beta(Cell("full")) is None


def test_report_from_a_finished_sweep(tmp_path, study_file):
    import csv

    from lorasweep.cli import main

    out = tmp_path / "study"
    path = study_file(search={"methods": ["lora", "full"], "ranks": [2, 4, 8],
                              "lr": [1e-3, 3e-3, 1e-2], "seeds": [0, 1]},
                      train={"steps": 6})
    assert main(["run", str(path), "--out", str(out)]) == 0
    for name in ("optima.csv", "report.md", "report.html", "metric_vs_lr.png", "peaks.png",
                 "lr_star_vs_rank.png"):
        assert (out / name).exists(), name
    with open(out / "optima.csv") as handle:
        optima = list(csv.DictReader(handle))
    assert len(optima) == 4  # lora at three ranks, and full
    for column in ("method", "rank", "lora_alpha", "init", "lr_best", "lr_star", "lr_star_low",
                   "lr_star_high", "peak", "peak_std", "n_seeds", "edge"):
        assert column in optima[0]
    assert all(row["n_seeds"] == "2" for row in optima)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Optimal LR against rank" in html
    assert "At one shared learning rate" in (out / "report.md").read_text()
    # the report command rebuilds it from the folder alone
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()


def test_a_flat_curve_has_no_optimum():
    rows = rows_for(3e-3)
    for row in rows:
        row["metric"] = 1 / 3
    (optimum,) = find_optima(trial_records(rows), maximize=True)
    assert optimum.edge == "flat" and optimum.suggest == []


def test_an_lr_where_one_seed_diverged_is_never_the_optimum():
    rows = rows_for(1e-2, seeds=(0, 1))
    for row in rows:
        if row["lr"] == pytest.approx(1e-2) and row["seed"] == 1:
            row["status"], row["metric"] = "diverged", None
    (optimum,) = find_optima(trial_records(rows), maximize=True)
    assert optimum.lr_best != pytest.approx(1e-2) and optimum.diverged == 1


def test_cell_names_tell_alpha_modes_apart():
    from lorasweep.analysis.compare import cell_name, family_name

    base = {"method": "lora", "rank": 8, "init": "kaiming"}
    named = {**base, "lora_alpha": 16.0, "alpha_mode": "per_rank"}
    assert cell_name(Cell.from_row(named)) == "lora r=8 a=2r"
    assert cell_name(Cell.from_row({**named, "alpha_mode": "constant"})) == "lora r=8 a=16"
    # as the study file wrote it, in its shortest form; the family's name drops the rank only
    assert cell_name(Cell("lora", rank=8, lora_alpha="2.0r", init="kaiming")) == "lora r=8 a=2r"
    assert family_name(Cell.from_row(named)) == "lora a=2r"


def test_report_with_one_cell_at_the_grids_edge_and_one_inside(tmp_path):
    """Every seed agreeing on an edge LR gives an interval of that one LR (it was an ulp off
    through log10, and the figure refused the negative error bar)."""
    from lorasweep.report import write_report

    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    rows = (rows_for(1.0, seeds=(0, 1), rank=4, grid=grid)
            + rows_for(6e-3, seeds=(0, 1), rank=8, grid=grid))
    edge, inside = find_optima(trial_records(rows), maximize=True)
    assert edge.edge == "high" and edge.lr_star_low == edge.lr_star == edge.lr_star_high == 3e-2
    assert inside.edge == "" and inside.lr_star_low <= inside.lr_star <= inside.lr_star_high
    write_report(tmp_path, trial_records(rows), "accuracy", True, "edge")
    assert (tmp_path / "lr_star_vs_rank.png").exists()
