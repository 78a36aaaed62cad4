"""What a person watching `lorasweep run` sees: plain lines off a terminal, one live line on one."""

from __future__ import annotations

import io
import re
from pathlib import Path

from lorasweep.cli import main
from lorasweep.config import load_study
from lorasweep.space import expand_trials
from lorasweep.study.progress import RunProgress

LINE = re.compile(r"^study tiny: (\d+)/4 trials done \((.+)\); elapsed \d\d:\d\d, ETA (\S+)$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_finished_trial_is_one_plain_line(tmp_path: Path, study_file,
                                                               capsys, monkeypatch):
    """Four trials trained one at a time (the CPU default): four lines in order, each naming its
    trial's group, with an ETA once a trial has finished; nothing redrawn; nothing on stdout
    but the results; a second run that has nothing to do prints no progress at all."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = tmp_path / "study"
    assert main(["run", str(study_file()), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("study tiny")]
    assert "\r" not in captured.err and "trials done" not in captured.out
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m[1]) for m in matches] == [1, 2, 3, 4]
    assert [m[2] for m in matches] == ["lora r=4 lr 0.001", "lora r=4 lr 0.01",
                                       "full lr 0.001", "full lr 0.01"]
    assert all(re.fullmatch(r"\d\d:\d\d", m[3]) for m in matches), lines
    assert matches[-1][3] == "00:00"
    assert main(["run", str(study_file()), "--out", str(out)]) == 0
    assert "study tiny" not in capsys.readouterr().err


def test_on_a_terminal_one_live_line_shows_count_group_step_and_eta(study_file, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    trials = expand_trials(load_study(study_file()))
    screen = Terminal()
    progress = RunProgress("study tiny", len(trials), file=screen)
    progress.start(trials[:1])(5, 12)
    progress.finished(trials[:1])
    progress.start(trials[1:2])(3, 12)
    shown = screen.getvalue().split("\r")[-1]
    assert "study tiny" in shown and "1/4" in shown and "trial" in shown
    assert "lora r=4 lr 0.01 step 3/12" in shown
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", shown), shown  # elapsed < ETA
    assert "\n" not in screen.getvalue()  # redrawn in place, never a new line while running
    progress.close()


def test_tqdm_disable_silences_both(study_file, monkeypatch):
    """The workers of --workers run with TQDM_DISABLE=1: their parent alone shows progress."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    trials = expand_trials(load_study(study_file()))
    for screen in (io.StringIO(), Terminal()):
        progress = RunProgress("study tiny", len(trials), file=screen)
        progress.start(trials[:1])(1, 12)
        progress.finished(trials[:1])
        progress.close()
        assert screen.getvalue() == ""
