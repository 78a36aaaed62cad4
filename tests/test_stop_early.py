"""search.stop_early: decay probes and pauses change nothing a trial computes; the rung decisions
are pure functions of the recorded evaluations (the replay makes a real run's decisions); a
pruned trial is recorded once with its curve; resume, kills, several workers and fused groups
decide alike; bad settings are one line."""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lorasweep.cli import main
from lorasweep.config import StopEarly, TrainSpec, load_study
from lorasweep.optim import probe_steps, rung_steps
from lorasweep.space import Cell, TrialSpec, expand_trials
from lorasweep.study.plan import recorded_outcomes, replay_search
from lorasweep.study.rungs import Outcome, decide
from lorasweep.study.store import Store
from lorasweep.train import BestOf, Rungs, train_group

from .conftest import make_records, read_rows, refused, tiny_study, write_jsonl
from .test_methods import tiny, toy_task

CPU = torch.device("cpu")
LORA = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")


def _trials(cell: Cell = LORA, lrs=(1e-3, 1e-2, 3e-2)) -> list[TrialSpec]:
    return [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate(lrs)]


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["lora", "full"])
def test_probes_and_pauses_change_nothing_a_trial_computes(method):
    """A group evaluated at rungs (each after a decay probe that is thrown away) ends with the
    numbers of a plain run; paused at each rung and resumed from its checkpoints, by fewer
    trials each time (LoRA: K = 3, then 2, then 1: a stopped trial leaves the group; full
    fine-tuning trains one trial per model copy), it ends with them too, bit for bit; and the
    rungs it records are the recording run's. The trials count at their best evaluation
    (task.select best, every 3 steps), which a pause carries over too."""
    base, task = tiny("tiny:bert"), toy_task()
    train = TrainSpec(steps=16, batch_size=8, warmup_ratio=0.125, lora_dropout=0.1,
                      eval_every=3)
    best = BestOf("eval_loss", maximize=False)
    trials = _trials() if method == "lora" else _trials(Cell(method="full"), lrs=(1e-3,))
    plain = [r for t in (trials if method == "full" else [None]) for r in
             train_group(base, task, train, trials if t is None else [t], CPU,
                                         best_of=best)]
    recording = Rungs(steps=(4, 8), probes=(2, 3), pause=False, raw=True)
    probed = train_group(base, task, train, trials, CPU, rungs=recording, best_of=best)
    for a, b in zip(plain, probed, strict=True):
        assert a.loss_curve == b.loss_curve and a.metrics == b.metrics and a.test == b.test
        assert [r["step"] for r in b.rungs] == [4, 8]
        assert {"eval_loss", "accuracy", "raw_eval_loss", "raw_accuracy"} <= set(b.rungs[0])
    assert probed[-1].rungs[1]["eval_loss"] != probed[-1].rungs[1]["raw_eval_loss"]
    pausing = Rungs(steps=(4, 8), probes=(2, 3), pause=True)
    first = train_group(base, task, train, trials, CPU, rungs=pausing, best_of=best)
    assert {r.status for r in first} == {"paused"} and first[0].steps == 4
    second = train_group(base, task, train, trials[-2:], CPU, rungs=pausing, best_of=best,
                         resume=[r.checkpoint for r in first[-2:]])
    assert {r.steps for r in second} == {8}
    (third,) = train_group(base, task, train, trials[-1:], CPU, rungs=pausing, best_of=best,
                           resume=[second[-1].checkpoint])
    assert third.status == "complete" and third.steps == 16
    assert third.loss_curve == plain[-1].loss_curve
    assert third.metrics == plain[-1].metrics and third.test == plain[-1].test
    assert third.selected_step == plain[-1].selected_step
    assert [{k: v for k, v in r.items() if not k.startswith("raw_")} for r in probed[-1].rungs] \
        == third.rungs
    if method == "lora":  # the weights an adapter trial keeps for export are the plain run's
        assert all(torch.equal(third.weights[n], plain[-1].weights[n]) for n in third.weights)


@pytest.mark.numerics
def test_a_wsd_probe_is_the_shorter_wsd_run():
    """With the wsd schedule a probe at step s, of c steps, trains exactly the wsd run of s + c
    steps whose plateau ends at s (Hagele et al. 2024): its evaluation is that run's."""
    base, task = tiny("tiny:bert"), toy_task()
    long = TrainSpec(steps=16, batch_size=8, warmup_ratio=0.125, schedule="wsd",
                     lora_dropout=0.1)
    short = long.model_copy(update={"steps": 10, "decay_ratio": 0.2})  # warmup 2, decay 2
    probed = train_group(base, task, long, _trials(), CPU,
                         rungs=Rungs(steps=(8,), probes=(2,), pause=False))
    ended = train_group(base, task, short, _trials(), CPU)
    for trial, run in zip(probed, ended, strict=True):
        assert trial.rungs[0]["eval_loss"] == run.metrics["eval_loss"]


def test_rung_steps_and_probe_lengths():
    train = TrainSpec(steps=64, warmup_ratio=0.0625)
    assert rung_steps([0.0625, 0.125, 0.25, 0.5], train, 64) == [4, 8, 16, 32]
    assert [probe_steps(0.25, s) for s in (4, 8, 16, 32)] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="between the warmup's end"):
        rung_steps([0.03], train, 64)
    with pytest.raises(ValueError, match="two on one step"):
        rung_steps([0.1, 0.11], TrainSpec(steps=10, warmup_ratio=0), 10)


# The decisions, on outcomes written out by hand.

RULE = StopEarly(rungs=[0.25, 0.5], drift=0)  # the window: one grid step each side
GRID = _trials(lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2))


def _paused(*scores: float) -> Outcome:
    return Outcome("paused", None, tuple({"step": 4 * (i + 1), "probe_steps": 1,
                                          "eval_loss": s} for i, s in enumerate(scores)))


def test_a_rung_keeps_the_best_and_its_window_once_every_trial_reached_it():
    losses = [1.0, 0.8, 0.6, 0.5, 0.7, 2.0]
    outcomes = {t.key: _paused(loss) for t, loss in zip(GRID, losses, strict=True)}
    waiting = {**outcomes, GRID[0].key: Outcome("running")}
    assert not decide(GRID, waiting, RULE, "eval_loss", False).go, "one trial is not there yet"
    made = decide(GRID, outcomes, RULE, "eval_loss", False)
    assert made.go == {t.key for t in GRID[2:5]}  # the best (3e-3) and one grid step each side
    assert set(made.stop) == {GRID[0].key, GRID[1].key, GRID[5].key}
    assert "stopped at rung 1 (step 4): eval_loss after the decay probe 2 at lr 0.03" \
        in made.stop[GRID[5].key]
    # a drift keeps LRs further below the best (the optimum of a longer run sits lower): 1.2
    # decades per decade of steps, over the log10(4) still to go, is 1.5 grid steps of 0.48
    wider = decide(GRID, outcomes, RULE.model_copy(update={"drift": 1.2}), "eval_loss", False)
    assert wider.go == {t.key for t in GRID[1:5]}


def test_a_later_rung_waits_for_the_trials_that_went_on_and_never_reopens_the_first():
    losses = [1.0, 0.8, 0.6, 0.5, 0.7, 2.0]
    outcomes = {t.key: Outcome("pruned", None, _paused(loss).rungs)
                for t, loss in zip(GRID, losses, strict=True)}
    outcomes[GRID[2].key] = _paused(0.6, 0.40)
    outcomes[GRID[3].key] = _paused(0.5, 0.45)
    outcomes[GRID[4].key] = Outcome("waiting")
    assert decide(GRID, outcomes, RULE, "eval_loss", False).go == set()
    outcomes[GRID[2].key] = _paused(0.6, 0.30)  # the lowest kept LR is now the best
    outcomes[GRID[4].key] = _paused(0.7, 0.50)
    made = decide(GRID, outcomes, RULE, "eval_loss", False)
    assert made.go == {GRID[2].key, GRID[3].key} and set(made.stop) == {GRID[4].key}
    # the LR below the best stopped at rung 1 stays stopped: decisions are never reopened
    assert GRID[1].key not in made.go
    # a best that moves up (1e-2) is noise, as the horizon only pulls the optimum down: the
    # window still reaches one grid step below the lowest best of any rung (3e-3)
    outcomes[GRID[2].key] = _paused(0.6, 0.40)
    outcomes[GRID[4].key] = _paused(0.7, 0.30)
    made = decide(GRID, outcomes, RULE, "eval_loss", False)
    assert made.go == {t.key for t in GRID[2:5]} and not made.stop
    assert GRID[5].key not in made.go


def test_seeds_are_averaged_and_a_diverged_seed_scores_worst():
    """3e-3 is the best on the mean over seeds though 1e-2 scores best in seed 0: its seed 1
    diverged (in its probe, or before the rung), which scores worst."""
    seeded = [TrialSpec(grid_id=i, cell=LORA, lr=lr, seed=seed)
              for i, (lr, seed) in enumerate((lr, seed) for lr in (1e-3, 3e-3, 1e-2, 3e-2)
                                             for seed in (0, 1))]
    scores = {1e-3: (0.9, 0.3), 3e-3: (0.5, 0.5), 1e-2: (0.2, math.nan), 3e-2: (0.8, 0.8)}
    outcomes = {t.key: _paused(scores[t.lr][t.seed]) for t in seeded}
    made = decide(seeded, outcomes, RULE, "eval_loss", False)
    assert {t.lr for t in seeded if t.key in made.go} == {1e-3, 3e-3, 1e-2}
    assert set(made.stop) == {seeded[6].key, seeded[7].key}
    diverged = {**outcomes, seeded[5].key: Outcome("diverged")}
    assert decide(seeded, diverged, RULE, "eval_loss", False).stop == made.stop


def test_an_lr_added_later_is_decided_without_reopening_the_rung():
    """A transfer search widens a bracket after its trials went on: the new LR pauses at the
    first rung and takes that rung's decision from every score recorded there."""
    outcomes = {t.key: Outcome("complete", loss, _paused(loss, loss).rungs)
                for t, loss in zip(GRID[2:5], [0.6, 0.5, 0.7], strict=True)}
    outcomes[GRID[1].key] = _paused(0.8)
    made = decide(GRID[1:5], outcomes, RULE, "eval_loss", False)
    assert made.stop.keys() == {GRID[1].key} and not made.go


# Whole runs on the tiny model: one run of the study with stopping, shared by the tests that
# compare other ways of running it with it.

def _stopping(data_files, **stop) -> dict:
    return tiny_study(data_files, task={"metric": "eval_loss", "validation_size": 24,
                                        "test_file": None},
                      train={"steps": 16, "warmup_ratio": 0.125, "dropout": "off"},
                      search={"methods": ["lora"], "lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                              "seeds": [0, 1], "stop_early": {
                                  "rungs": [0.25, 0.5], "drift": 0, **stop}})


def _write(folder: Path, study: dict, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(study))
    return path


def _by_trial(folder: Path) -> dict[tuple[str, str], dict]:
    return {(r["lr"], r["seed"]): r for r in read_rows(folder)}


def _outcomes(folder: Path) -> dict:
    return {k: {c: r[c] for c in ("status", "steps", "metric", "rung_metric")}
            for k, r in _by_trial(folder).items()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """The study file, and the folder of one run of it (one worker, one trial at a time)."""
    folder = tmp_path_factory.mktemp("stop-early")
    data = {"train": write_jsonl(folder / "train.jsonl", make_records(240, 0)),
            "test": write_jsonl(folder / "test.jsonl", make_records(60, 1))}
    path = _write(folder, _stopping(data))
    assert main(["run", str(path), "--out", str(folder / "one")]) == 0
    return path, folder / "one"


def test_the_replay_makes_the_decisions_a_real_run_makes(tmp_path: Path, stopped):
    """A full grid that records its rungs (stop: false), replayed with stopping on, stops the
    very trials a real run with stopping stops, at the same rungs, and every trial that runs to
    the end scores what it scored in the full grid (a paused trial trains on as it would)."""
    path, one = stopped
    grid_study = yaml.safe_load(path.read_text())
    grid_study["search"]["stop_early"]["stop"] = False
    grid_path = _write(tmp_path, grid_study, "grid.yaml")
    assert main(["run", str(grid_path), "--out", str(tmp_path / "grid")]) == 0
    grid, real = _by_trial(tmp_path / "grid"), _by_trial(one)
    assert {r["status"] for r in grid.values()} == {"complete"}
    study = load_study(path)
    replayed = replay_search(study, recorded_outcomes(study, tmp_path / "grid"), False)
    by_key = {t.key: (f"{t.lr:g}", str(t.seed)) for t in expand_trials(study)}
    as_replayed = {by_key[key]: outcome for key, outcome in replayed.items()}
    stopped_trials = {k for k, r in real.items() if r["status"] == "pruned"}
    assert stopped_trials == {k for k, o in as_replayed.items() if o.status == "pruned"}
    assert stopped_trials and len(stopped_trials) < len(real)
    for key, row in real.items():
        if row["status"] == "pruned":
            assert as_replayed[key].steps == int(row["steps"])
            assert row["reason"].startswith("stopped at rung")
        else:
            assert row["metric"] == grid[key]["metric"]


def test_a_pruned_trial_is_recorded_once_with_its_curve_and_the_report_shows_the_saving(
        stopped, capsys):
    _, out = stopped
    rows = read_rows(out)
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(int(r["steps"]) in (4, 8) and r["rung_metric"] for r in pruned)
    assert all(int(r["attempts"]) == 1 for r in rows)
    store = Store(out, "tiny", maximize=False, create=False)
    for status, trial, _ in store.latest_by_key().values():
        if status == "pruned":
            assert trial.state.name == "PRUNED" and len(trial.user_attrs["loss_curve"]) \
                == trial.user_attrs["steps"]
            assert set(trial.intermediate_values) == {r["step"] for r in
                                                      trial.user_attrs["rungs"]}
    assert not list((out / "checkpoints").glob("*.pt")), "no checkpoint outlives its trial"
    assert "## Stopped early" in (out / "report.md").read_text()
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(pruned)} pruned" in printed and "Stopped early:" in printed


def test_fused_groups_two_workers_and_lost_checkpoints_decide_as_one_worker(tmp_path: Path,
                                                                          stopped):
    """Groups of 5 (all of a seed's LRs fused, the survivors fused again from their
    checkpoints), two worker processes, and a worker without the folder's checkpoints (another
    machine: it trains a trial that goes on from a rung again from the start) record the
    statuses and metrics of one worker one trial at a time."""
    import lorasweep.study.runner as runner

    path, one = stopped
    for name, extra in (("fused", ["--max-group", "5"]), ("workers", ["--workers", "2"])):
        assert main(["run", str(path), "--out", str(tmp_path / name), *extra]) == 0
        assert _outcomes(tmp_path / name) == _outcomes(one), name
    original = runner.load_checkpoints
    runner.load_checkpoints = lambda *args: None
    try:
        assert main(["run", str(path), "--out", str(tmp_path / "elsewhere")]) == 0
    finally:
        runner.load_checkpoints = original
    assert _outcomes(tmp_path / "elsewhere") == _outcomes(one)


def test_a_worker_killed_mid_segment_loses_nothing_and_each_trial_ends_once(tmp_path: Path,
                                                                          stopped):
    """SIGKILL while a trial trains on from a rung: the rerun resumes it from its checkpoint;
    every trial ends once (complete or pruned) with the numbers of a run never killed."""
    path, one = stopped
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorasweep.cli", "run", str(path),
                                "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline, store = time.time() + 240, None
    while time.time() < deadline and process.poll() is None:
        if (out / "optuna.journal").exists():
            store = store or Store(out, "tiny", maximize=False, create=False)
            if any(t.user_attrs.get("from_step") for t in store.trials()
                   if t.state.name == "RUNNING"):
                break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before a trial went on from a rung"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert _outcomes(out) == _outcomes(one)
    killed = _by_trial(out)
    assert sum(int(r["attempts"]) for r in killed.values()) == len(killed) + 1
    store = Store(out, "tiny", maximize=False, create=False)
    ended = [t.user_attrs["trial_key"] for t in store.trials()
             if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ended) == len(set(ended)) == len(killed)


@pytest.mark.parametrize(("change", "message"), [
    ({"search": {"stop_early": {"rungs": [0.5, 0.25]}}},
     "search.stop_early.rungs: [0.5, 0.25]: give each rung once, in ascending order"),
    ({"search": {"stop_early": {"rungs": [1.5]}}}, "search.stop_early.rungs.0"),
    ({"search": {"stop_early": {"cooldown": 0}}}, "search.stop_early.cooldown"),
    ({"search": {"stop_early": {"rungs": [0.01]}}},
     "search.stop_early.rungs: rung 0.01 of 12 steps is step 0: a rung lies between the "
     "warmup's end (step 2) and the last step"),
    ({"train": {"schedule": "wsd", "warmup_ratio": 0.5, "decay_ratio": 0.6}},
     "train.warmup_ratio 0.5 + train.decay_ratio 0.6 is above 1"),
])
def test_bad_stop_early_settings_are_one_line(tmp_path: Path, data_files, capsys, change,
                                              message):
    study = tiny_study(data_files, search={"stop_early": {"rungs": [0.25]}})
    for section, values in change.items():
        study[section] = {**study[section], **copy.deepcopy(values)}
    assert message in refused(tmp_path, study, capsys)


def test_a_trainer_command_refuses_stop_early(tmp_path: Path, capsys):
    study = {"name": "cmd", "task": {"kind": "external", "metric": "score", "goal": "maximize"},
             "trainer": {"command": ["true"], "result": {"file": "r.json", "key": "score"}},
             "search": {"methods": ["lora"], "lr": [1e-3], "stop_early": {}}}
    assert "search.stop_early: needs lorasweep's own training" in refused(tmp_path, study,
                                                                           capsys)


def test_paused_trials_go_on_once_stopping_is_turned_off_or_its_rungs_are_fewer():
    """A study resumed without stopping (or with fewer rungs than its trials paused at) lets
    every paused trial train on to the end instead of leaving it waiting for a decision."""
    from lorasweep.study.plan import plan_study

    study = load_study_dict({"stop_early": {"rungs": [0.25, 0.5], "drift": 0}})
    trials = expand_trials(study)
    outcomes = {t.key: _paused(0.5, 0.4) for t in trials}
    decided = plan_study(study, outcomes, False).decisions  # every LR scored alike at rung 2:
    assert len(decided.go) == 2 and len(decided.stop) == 1  # the lowest and its neighbour go
    for changed in ({"stop_early": {"rungs": [0.25, 0.5], "stop": False}},
                    {"stop_early": None}, {"stop_early": {"rungs": [0.25], "drift": 0}}):
        decided = plan_study(load_study_dict(changed), outcomes, False).decisions
        assert decided.go == {t.key for t in trials} and not decided.stop, changed


def load_study_dict(search: dict):
    from lorasweep.config import validate_study

    return validate_study({"name": "s", "model": {"source": "tiny:bert"},
                           "task": {"kind": "classification", "dataset": "unused",
                                    "metric": "eval_loss"},
                           "train": {"steps": 16, "warmup_ratio": 0.0},
                           "search": {"methods": ["lora"], "lr": [1e-3, 1e-2, 1e-1],
                                      **search}}, "s")


def test_the_replay_on_the_shipped_grids_gives_the_figures_benchmarks_readme_records(
        capsys, monkeypatch):
    """`benchmarks/search_cost.py --stop-early default` on the three recorded real grids
    (examples/results/rungs-*): the steps spent and every cell within one grid step, as
    benchmarks/README.md and docs/search.md state them."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    importlib.import_module("search_cost").main(["--skip-transfer", "--stop-early", "default"])
    rows = {cells[1]: cells[4:6] for line in capsys.readouterr().out.splitlines()
            if (cells := line.split(" | "))[0] == "| stop_early with its defaults"}
    assert rows == {"rungs-text-plays": ["1278 / 4896 (26%)", "3/3 (100%)"],
                    "rungs-vision-ranks": ["2352 / 9484 (25%)", "4/4 (100%)"],
                    "rungs-charlm-gsm8k": ["1440 / 5472 (26%)", "3/3 (100%)"]}
