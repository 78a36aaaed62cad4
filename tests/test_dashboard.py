"""`lorasweep dashboard` as a person sees it: optuna-dashboard served on a study that is still
training, opened in headless Chromium (Debian's package, as tests/test_report_browser.py drives
it), lists the trials recorded so far, each with its `lr` parameter and its metric as the value.
The journal is opened read-only: the view never writes to what the workers write."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lorasweep.cli import main
from lorasweep.study.backend import ReadOnlyJournalBackend
from lorasweep.study.dashboard import locate
from lorasweep.study.store import Store

from .conftest import need_part, tiny_study, wait_until, write_study

# LRs whose shortest text is the same in Python and JavaScript (no exponent in either)
LRS = [1e-4, 1.5e-4, 2e-4, 3e-4, 4e-4, 5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 5e-3, 7e-3,
       0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2]
# how many trials the page shows as complete (a chip per trial in the list)
COMPLETE_CHIPS = """() => [...document.querySelectorAll('*')]
    .filter(e => e.childElementCount === 0 && e.textContent === 'Complete').length"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lorasweep(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorasweep.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def completed(store: Store) -> dict[int, tuple[float, float]]:
    """Optuna trial number -> (lr, value) of the trials recorded complete so far."""
    return {t.number: (t.params["lr"], t.value)
            for t in store.trials(states=(TrialState.COMPLETE,))}


def serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_dashboard_lists_recorded_trials_with_lr_and_metric_while_the_study_runs(
        tmp_path: Path, data_files: dict[str, Path]):
    need_part("chromium")
    from playwright.sync_api import sync_playwright

    study = write_study(tmp_path / "study.yaml", tiny_study(
        data_files, search={"methods": ["lora"], "lr": LRS}, train={"steps": 20}))
    out = tmp_path / "out"
    port = free_port()
    base = f"http://127.0.0.1:{port}/dashboard/"
    run = lorasweep("run", str(study), "--out", str(out), "--threads", "1")
    dashboard = None
    try:
        wait_until("the study's journal", lambda: (out / "optuna.journal").exists(), 40)
        store = Store(out, "tiny", maximize=True, create=False)
        wait_until("two recorded trials", lambda: len(completed(store)) >= 2, 60)
        dashboard = lorasweep("dashboard", str(out), "--port", str(port))
        wait_until("the dashboard", lambda: serving(f"http://127.0.0.1:{port}/api/meta"), 60)
        shown = completed(store)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}studies/0/trials")
            page.wait_for_function("() => document.body.innerText.includes('Trial 1')",
                                   timeout=30_000)
            listed = page.evaluate("() => document.body.innerText")
            for number, (lr, value) in sorted(shown.items())[:2]:
                page.goto(f"{base}studies/0/trials?numbers={number}")
                page.wait_for_function(f"() => document.body.innerText.includes('lr {lr!r}')",
                                       timeout=30_000)
                text = page.evaluate("() => document.body.innerText")
                assert f"Trial {number}" in text and repr(value) in text, (number, lr, value)
            # live: a trial recorded after the page opened shows without a reload
            before = page.evaluate(COMPLETE_CHIPS)
            page.wait_for_function(f"() => ({COMPLETE_CHIPS})() > {before}", timeout=30_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"))
            browser.close()
        still_running = run.poll() is None
    finally:
        for process in (dashboard, run):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    for number in shown:
        assert f"Trial {number}" in listed
    assert still_running, "the study finished before the dashboard showed it: not a live view"
    assert len(shown) < len(LRS)


def test_the_journal_is_opened_read_only(tmp_path: Path):
    journal = tmp_path / "optuna.journal"
    journal.write_text('{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n'
                       '{"op_co')  # a record cut short by a writer: left for the writer
    backend = ReadOnlyJournalBackend(str(journal))
    assert len(list(backend.read_logs(0))) == 1
    with pytest.raises(Exception, match="read-only"):
        backend.append_logs([{"op_code": 1}])
    assert journal.read_text().endswith('{"op_co')


def test_where_a_dashboard_reads(tmp_path: Path, capsys):
    (tmp_path / "optuna.journal").write_text("")
    assert locate(str(tmp_path)) == (None, tmp_path / "optuna.journal")
    assert locate(str(tmp_path / "optuna.journal")) == (None, tmp_path / "optuna.journal")
    assert locate("postgresql://me@host/db")[0] == "postgresql://me@host/db"
    # a bad source, or a database URL with a secret, is one line that shows no secret
    assert main(["dashboard", str(tmp_path / "nothing")]) == 2
    assert main(["dashboard", "mysql://me:hunter2@host/db"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and "hunter2" not in err, err


def test_dashboard_not_installed_is_one_line(tmp_path: Path, monkeypatch, capsys):
    from lorasweep import optional

    monkeypatch.setattr(optional, "installed", lambda module: module != "optuna_dashboard")
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lorasweep: error: lorasweep dashboard: needs optuna-dashboard, which is not "
                   "installed here: pip install optuna-dashboard"), err
