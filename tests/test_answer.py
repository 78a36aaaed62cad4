"""The answer section, from synthetic trials whose optima and differences are known."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorasweep.analysis.summary import StudyAnalysis
from lorasweep.cli import main
from lorasweep.report import write_report
from lorasweep.report.answer import answer_text, build_answer, interval_text

from .conftest import rows_for, trial_records

LORA_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
FULL_GRID = [1e-6, 3e-6, 1e-5, 3e-5]  # full FT's optimum (1e-4) lies above its grid


def study_rows(seeds=(0, 1, 2), full_gap: float = 0.05, full_noise: float = 0.0
               ) -> list[dict]:
    """LoRA peaking inside its grid at 1e-3 (accuracy 0.9); full FT at its grid's high edge
    (0.8727 there), `full_gap` lower, its seeds `full_noise` apart."""
    rows = rows_for(1e-3, seeds=seeds, grid=LORA_GRID)
    full = rows_for(1e-4, seeds=seeds, grid=FULL_GRID, method="full")
    for row in full:
        row.update(rank=None, lora_alpha=None, alpha_mode=None, init=None, target_modules=None)
        row["metric"] += full_noise * (-1) ** row["seed"] - full_gap
    for row in rows + full:
        row["metric"] += 0.001 * row["seed"]  # seeds differ, so peaks have intervals
    return rows + full


def analysis_of(rows: list[dict]) -> StudyAnalysis:
    return StudyAnalysis(trial_records(rows), "accuracy", maximize=True)


def parts_of_analysis(analysis: StudyAnalysis) -> dict[str, list[str]]:
    return {p.label: p.lines for p in build_answer(analysis)}


def parts_of(rows: list[dict]) -> dict[str, list[str]]:
    return parts_of_analysis(analysis_of(rows))


def test_answer_names_the_best_its_rival_the_lrs_the_ratio_and_the_edge():
    parts = parts_of(study_rows())
    assert list(parts) == ["Best", "Versus the best", "Recommended LR (refined between grid LRs)",
                           "LoRA / full-FT LR ratio", "Next"]
    (best,) = parts["Best"]
    assert best.startswith("lora r=8 a=2r: accuracy 0.901 (95% interval")
    assert "over 3 seeds) at its tuned LR 0.001" in best
    assert parts["Versus the best"] == [
        "full 0.8237: distinguishable (difference -0.07734, 95% interval -0.07867 to -0.07601)"]
    full, lora = sorted(parts["Recommended LR (refined between grid LRs)"])
    assert full.startswith("full: 3e-05 (95% interval")
    assert "at the high edge of its grid, so the optimum may lie above: add 9e-05, 0.00027" in full
    assert lora.startswith("lora: 0.001 (95% interval") and "edge" not in lora
    # full FT's true optimum lies above its grid, so the true ratio is at most what was measured
    (ratio,) = parts["LoRA / full-FT LR ratio"]
    assert ratio == "lora / full: at most 33.33; practitioners use about 10"
    assert parts["Next"] == ["widen full's LR grid up: add 9e-05, 0.00027 (full peaks at the high "
                             "edge)"]


def test_overlapping_peaks_ask_for_seeds():
    parts = parts_of(study_rows(full_gap=-0.0273, full_noise=0.01))
    (versus,) = parts["Versus the best"]
    assert ": not distinguishable (difference " in versus
    assert ("add seeds (search.seeds) to separate the best from the 1 cell whose difference "
            "interval includes 0") in parts["Next"]


def test_one_seed_says_what_it_means():
    parts = parts_of(study_rows(seeds=(0,)))
    assert "(one seed) at its tuned LR" in parts["Best"][0]
    assert parts["Versus the best"] == [
        "one seed, so no interval: seed noise alone may explain these differences; add seeds to "
        "tell", "full 0.8227 (difference -0.07734)"]
    assert all("one seed: no interval" in line
               for line in parts["Recommended LR (refined between grid LRs)"])
    assert any(a.startswith("add seeds (search.seeds, e.g. [0, 1, 2])") for a in parts["Next"])


def test_a_tie_names_no_best_and_unfinished_trials_are_counted():
    rows = study_rows(seeds=(0,))
    for row in rows:
        row["metric"] = 0.5
    rows.append({**rows[0], "status": "waiting", "metric": None})
    parts = parts_of(rows)
    assert parts["Best"] == ["none: every cell scored accuracy 0.5 at its tuned LR"]
    assert "Versus the best" not in parts
    assert parts["LoRA / full-FT LR ratio"] == [
        "lora / full: not measured: lora and full scored the same at every LR"]
    assert parts["Next"][0].startswith("finish the study: 1 trial has not finished")
    assert not any("seeds" in a for a in parts["Next"])


def test_versus_the_best_reads_the_reports_own_pairwise_differences():
    """Each rival's interval in the answer is the pairwise table's difference read the other
    way round (one bootstrap, read twice), so the two can never disagree about 0."""
    analysis = analysis_of(study_rows(seeds=(0, 1, 2), full_gap=0.001))
    lines = parts_of_analysis(analysis)["Versus the best"]
    best = max(range(len(analysis.peaks)), key=lambda i: analysis.peaks[i].mean)
    rivals = [d if d.j == best else d.flipped() for d in analysis.differences
              if best in (d.i, d.j)]
    assert rivals and all(d.low is not None for d in rivals)
    for rival in rivals:
        assert any(line.startswith(rival.a) and
                   f"95% interval {interval_text(rival.low, rival.high)})" in line
                   for line in lines)


def test_no_finished_trial():
    rows = [{**study_rows(seeds=(0,))[0], "status": "waiting", "metric": None}]
    text = answer_text(build_answer(analysis_of(rows)))
    assert text.splitlines()[:2] == ["answer:", "  Best: no trial has finished yet"]


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_report_opens_with_the_answer_and_explains_empty_sections(tmp_path, seeds):
    """The Markdown report: the answer right under the title; grids that share no LR give one
    line instead of a table without a winner; one seed drops the pairwise table and the peaks
    figure, saying why."""
    (tmp_path / "peaks.png").write_bytes(b"from an earlier report")
    write_report(tmp_path, trial_records(study_rows(seeds=seeds)), "accuracy", True, "synthetic")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# synthetic\n\n## Answer\n\n- **Best**: lora r=8 a=2r")
    shared = text[text.index("## At one shared learning rate"):].split("\n## ")[0]
    assert "share no learning rate" in shared and "|" not in shared
    one_seed = len(seeds) == 1
    assert ("## Pairwise differences at tuned LR" in text) != one_seed
    assert ("## Peaks at tuned LR" in text) != one_seed
    assert (tmp_path / "peaks.png").exists() != one_seed
    assert ("One seed per cell" in text) == one_seed
    html = (tmp_path / "report.html").read_text()
    assert html.index("<section id='answer'>") < html.index("<h2>Trials</h2>")


def test_shared_lr_table_keeps_only_lrs_two_cells_ran(tmp_path):
    rows = study_rows()
    rows += [{**r, "lr": 1e-4} for r in rows if r["method"] == "full" and r["lr"] == 3e-5]
    write_report(tmp_path, trial_records(rows), "accuracy", True, "synthetic")
    text = (tmp_path / "report.md").read_text()
    shared = text[text.index("## At one shared learning rate"):].split("\n## ")[0]
    lines = [line for line in shared.splitlines() if line.startswith("| 0")]
    assert len(lines) == 1 and lines[0].startswith("| 0.0001 |")


def test_many_cells_name_the_four_closest_and_a_best_at_the_edge_says_so():
    rows = [row for rank, lr in ((2, 1e-4), (4, 1e-3), (8, 1e-3), (16, 1e-3), (32, 1e-3),
                                 (64, 1e-3))
            for row in rows_for(lr, rank=rank, grid=LORA_GRID)]
    for row in rows:
        row["metric"] += 0.001 * row["rank"]  # higher ranks a little better
    parts = parts_of(rows)
    # rank 2's optimum (1e-4) is its grid's first LR, but rank 64 is best
    assert parts["Best"][0].endswith("at its tuned LR 0.001, the best of its grid")
    versus = parts["Versus the best"]
    assert [line.split(" ")[1] for line in versus[1:5]] == ["r=32", "r=16", "r=8", "r=4"]
    assert versus[5] == "and 1 more cell, further from the best"
    rows = [r for r in rows if r["rank"] == 2]
    assert parts_of(rows)["Best"][0].endswith("at its tuned LR 0.0001, at the low edge of its grid")


def test_status_and_report_read_a_folder_of_results_alone(tmp_path, capsys):
    """An example's study.yaml and trials.csv, without the records: `status` prints the answer
    the report opens with, and `report` rebuilds the same report.md."""
    folder = tmp_path / "batch-size"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples/results/batch-size", folder)
    committed = (folder / "report.md").read_text()
    assert main(["status", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("study batch-size: 40 trials: 40 complete")
    best = committed.split("- **Best**: ")[1].splitlines()[0]
    assert f"  Best: {best}\n" in printed
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.md").read_text() == committed
