"""report.html as a person sees it: rendered in headless Chromium, every figure loaded, no text
spilling out of its table, the answer section first with its parts, and a screenshot to look at.

Three kinds of study: a quickstart-like one (LoRA and full fine-tuning on grids that do not
overlap, one seed), a multi-seed one, and a recipe-axis one (the batch-size example's trials.csv,
reported again without training). Chromium comes from Debian's package, which
`scripts/setup.sh` installs where it can; elsewhere the tests skip with the line set-up printed
(tests/system_parts.py). Playwright drives the browser already on the machine (it downloads none).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorasweep.cli import main

from .conftest import need_part

CHROMIUM = shutil.which("chromium")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "results"


@pytest.fixture(autouse=True)
def chromium() -> None:
    need_part("chromium")


CHECKS = """() => {
  const images = [...document.images];
  const cells = [...document.querySelectorAll('td, th')];
  const tables = [...document.querySelectorAll('table')];
  const answer = document.querySelector('#answer');
  const first = document.querySelector('h1').nextElementSibling;
  return {
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    overflowing: cells.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent),
    wide_tables: tables.filter(t => t.getBoundingClientRect().right >
                                    document.documentElement.clientWidth + 1).length,
    answer_first: first !== null && first.id === 'answer',
    answer_top: answer ? answer.getBoundingClientRect().top : null,
    answer_bottom: answer ? answer.getBoundingClientRect().bottom : null,
    parts: answer ? [...answer.querySelectorAll('dt')].map(d => d.textContent) : [],
    answer_text: answer ? answer.innerText : '',
    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
    text: document.body.innerText,
  };
}"""


def render(folder: Path) -> dict:
    """Open the folder's report.html at a laptop's size; screenshot the whole page and the first
    screen (report.png, report-top.png)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((folder / "report.html").as_uri())
        page.wait_for_load_state("load")
        result = page.evaluate(CHECKS)
        page.screenshot(path=str(folder / "report.png"), full_page=True)
        page.screenshot(path=str(folder / "report-top.png"))
        browser.close()
    assert result["loaded"] == result["images"], result
    assert result["overflowing"] == [], result["overflowing"][:5]
    assert result["wide_tables"] == 0
    assert (folder / "report.png").stat().st_size > 10_000
    # the answer opens the report and is read whole on the first screen
    assert result["answer_first"], result["headings"]
    assert result["answer_bottom"] is not None and result["answer_bottom"] < 900, result
    assert result["parts"][0] == "Best" and result["parts"][-1] == "Next", result["parts"]
    assert "Recommended LR (refined between grid LRs)" in result["parts"]
    return result


def test_quickstart_like_report_answers_first(tmp_path: Path, study_file, capsys):
    """LoRA and full FT on their own grids, one seed: the answer says what one seed means, gives
    the LR ratio, and the shared-LR section says in one line that the grids share no LR. Ranked by
    eval_loss: a dozen steps of a tiny model leave accuracy at chance, the same at every LR."""
    out = tmp_path / "study"
    methods = [{"name": "lora", "lr": [1e-3, 1e-2, 1e-1]},
               {"name": "full", "lr": [1e-5, 1e-4, 3e-4]}]
    path = study_file(task={"metric": "eval_loss"},
                      search={"methods": methods, "ranks": [4], "seeds": [0]})
    assert main(["run", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = render(out)
    assert result["images"] == 1  # the peaks figure needs seeds: explained, not drawn
    assert result["parts"][:3] == ["Best", "Versus the best",
                                   "Recommended LR (refined between grid LRs)"]
    assert "LoRA / full-FT LR ratio" in result["parts"]
    assert "one seed" in result["answer_text"] and "add seeds" in result["answer_text"]
    assert "share no learning rate" in result["text"]
    assert "Pairwise differences at tuned LR" not in result["headings"]
    # `lorasweep run` ended with the same answer, and `lorasweep status` prints it again
    answer = printed[printed.index("answer:"):].strip()
    assert "Best: " in answer and "lora / full: " in answer and "Next:" in answer
    assert main(["status", str(out)]) == 0
    assert answer in capsys.readouterr().out


def test_multi_seed_report_has_intervals(tmp_path: Path, study_file):
    """Two seeds: the best and its rivals with 95% intervals (ranked by eval_loss, which a few
    steps move; accuracy stays at chance)."""
    out = tmp_path / "study"
    path = study_file(task={"metric": "eval_loss"},
                      search={"methods": ["lora", "rslora", "full"], "ranks": [2, 4],
                              "lr": [1e-3, 1e-2, 1e-1], "seeds": [0, 1]},
                      train={"steps": 6})
    assert main(["run", str(path), "--out", str(out)]) == 0
    result = render(out)
    assert result["images"] == 3
    assert "95% interval" in result["answer_text"]
    assert "Pairwise differences at tuned LR" in result["headings"]


def test_recipe_axis_report_from_an_example(tmp_path: Path):
    """The batch-size example (two seeds, a batch_size axis) reported again from its trials.csv:
    the recommended LR names the batch size it holds at and the range over batch sizes."""
    out = tmp_path / "batch-size"
    shutil.copytree(EXAMPLES / "batch-size", out)
    assert main(["report", str(out)]) == 0
    result = render(out)
    assert result["images"] == 3
    assert "Optimal LR against batch_size" in result["headings"]
    assert "batch_size=8 (95% interval" in result["answer_text"]
    assert "cells range" in result["answer_text"]
    assert "see Optimal LR against batch_size" in result["answer_text"]
