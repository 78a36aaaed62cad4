"""report.html as a person sees it: rendered in headless Chromium, every figure loaded, no text
spilling out of its table, and a screenshot to look at.

Chromium comes from Debian's package, which `.ci/run` installs; the test is skipped where it is
missing. Playwright drives the browser already on the machine (it downloads none).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")

CHECKS = """() => {
  const images = [...document.images];
  const cells = [...document.querySelectorAll('td, th')];
  const tables = [...document.querySelectorAll('table')];
  return {
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    overflowing: cells.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent),
    wide_tables: tables.filter(t => t.getBoundingClientRect().right >
                                    document.documentElement.clientWidth + 1).length,
  };
}"""


def test_report_renders_in_chromium(tmp_path: Path, study_file):
    from playwright.sync_api import sync_playwright

    from lorasweep.cli import main

    out = tmp_path / "study"
    path = study_file(search={"methods": ["lora", "rslora", "full"], "ranks": [2, 4],
                              "lr": [1e-3, 1e-2, 1e-1], "seeds": [0, 1]},
                      train={"steps": 6})
    assert main(["run", str(path), "--out", str(out)]) == 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        result = page.evaluate(CHECKS)
        page.screenshot(path=str(out / "report.png"), full_page=True)
        browser.close()
    assert result["images"] == 3 and result["loaded"] == 3, result
    assert result["overflowing"] == [], result["overflowing"][:5]
    assert result["wide_tables"] == 0
    assert (out / "report.png").stat().st_size > 10_000
