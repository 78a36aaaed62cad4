"""Many workers on one study, and the faults they must survive.

Every test compares against one clean single-process run of the same study: seeds fix every
number, so a study that survived kills, freezes and outages must record exactly those numbers,
each trial exactly once.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from lorasweep.config import dump_study, load_study
from lorasweep.errors import StudyError
from lorasweep.space import expand_trials
from lorasweep.study.folder import open_for_running
from lorasweep.study.local_workers import gpu_assignment, worker_threads
from lorasweep.study.store import Store

from .conftest import make_records, tiny_study, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
RESULT_ATTRS = ("train_loss", "val_accuracy", "val_eval_loss", "steps")


@pytest.fixture(scope="module")
def study_path(tmp_path_factory) -> Path:
    """Eight trials (4 LRs x 2 seeds) of a few seconds each on tiny:bert."""
    folder = tmp_path_factory.mktemp("workers")
    data = {"train": write_jsonl(folder / "train.jsonl", make_records(240, 0)),
            "test": write_jsonl(folder / "test.jsonl", make_records(60, 1))}
    study = tiny_study(data, train={"steps": 40},
                       search={"methods": ["lora"], "lr": [1e-3, 3e-3, 1e-2, 3e-2],
                               "seeds": [0, 1]})
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def lorasweep(*args: str, **kwargs) -> subprocess.Popen:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen([sys.executable, "-m", "lorasweep.cli", *args], env=ENV, text=True,
                            **{**pipes, **kwargs})


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.fixture(scope="module")
def clean(study_path: Path, tmp_path_factory) -> dict[str, dict]:
    """The clean run's results, per trial key."""
    out = tmp_path_factory.mktemp("clean") / "study"
    code, err = finish(lorasweep("run", str(study_path), "--out", str(out), "--threads", "1"))
    assert code == 0, err
    return results(Store(out, "tiny", maximize=True, create=False))


def results(store: Store) -> dict[str, dict]:
    """Per trial key, the recorded numbers; fails if any trial finished more than once."""
    finished = [t for t in store.trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    counts = Counter(t.user_attrs["trial_key"] for t in finished)
    assert set(counts.values()) == {1}, f"trials finished more than once: {counts}"
    return {t.user_attrs["trial_key"]: {a: t.user_attrs.get(a) for a in RESULT_ATTRS}
            for t in finished}


def create_study(study_path: Path, folder: Path, url: str | None, lease: float,
                 max_attempts: int) -> Store:
    """What `lorasweep run` does before its workers start: the study and its queue, once."""
    study = load_study(study_path)
    store = open_for_running(study, folder, url)
    store.configure(dump_study(study), lease_seconds=lease, max_attempts=max_attempts)
    store.sync(expand_trials(study))
    return store


def test_lost_trials_rerun_a_bounded_number_of_times(tmp_path: Path, study_path: Path):
    """A trial whose worker died is requeued; after max_attempts losses it fails, with why."""
    store = create_study(study_path, tmp_path / "study", None, lease=60, max_attempts=2)
    grid = expand_trials(load_study(study_path))
    dead = f"{os.uname().nodename}:{_dead_pid()}"
    for losses in (1, 2):
        while claimed := store.claim_group(1):  # every trial, as if by a worker that then died
            store.storage.set_trial_user_attr(claimed[0][0], "worker", dead)
        store.sync(grid)
        latest = store.latest_by_key().values()
        if losses == 1:
            assert {(s, n) for s, _, n in latest} == {("waiting", 2)}, "each lost run requeued"
        else:
            assert {(s, n) for s, _, n in latest} == {("failed", 2)}, "given up after 2 losses"
    assert all("stopped mid-trial 2 times" in t.user_attrs["reason"] for _, t, _ in latest)
    assert store.sync(grid, retry_failed=True) == len(grid)
    assert {s for s, _, _ in store.latest_by_key().values()} == {"waiting"}


def test_status_flags_a_claim_cut_off_as_the_store_does(tmp_path: Path, study_path: Path,
                                                       monkeypatch, capsys):
    """A worker killed between claiming a trial and naming itself leaves a running trial that
    nobody owns; `status` calls it stale by the store's own rule (Store._is_stale), so what it
    shows is what the next worker will do."""
    from lorasweep.cli import main
    from lorasweep.study.backend import optuna_trial_id

    folder = tmp_path / "study"
    store = create_study(study_path, folder, None, lease=60, max_attempts=2)
    [waiting, *_] = store.storage.get_all_trials(store.study_id, states=(TrialState.WAITING,))
    store.storage.set_trial_state_values(optuna_trial_id(waiting), state=TrialState.RUNNING)
    assert main(["status", str(folder)]) == 0
    claimed = f"running trial {waiting.user_attrs['grid_id']}: "
    assert f"{claimed}heartbeat " in capsys.readouterr().out  # within its claim's moment
    monkeypatch.setattr("lorasweep.study.store.CLAIM_SECONDS", 0.0)
    assert main(["status", str(folder)]) == 0
    assert f"{claimed}STALE: its claim was cut off" in capsys.readouterr().out
    assert [lease.stale for lease in store.leases()] == [True]


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_workers_share_a_postgres_study_through_an_outage(study_path: Path, tmp_path: Path,
                                                          postgres, clean):
    """`run --workers 2` on PostgreSQL; the server goes down mid-run and comes back."""
    url = postgres.new_database()
    out = tmp_path / "study"
    run = lorasweep("run", str(study_path), "--out", str(out), "--storage", url,
                    "--workers", "2", "--threads", "1", "--lease-seconds", "20")
    store = None
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None:
        try:
            store = store or Store(out, "tiny", maximize=True, create=False, storage_url=url)
        except StudyError:  # not created yet
            time.sleep(0.5)
            continue
        if Counter(s for s, _, _ in store.latest_by_key().values())["complete"] >= 2:
            break
        time.sleep(0.5)
    assert run.poll() is None, "the study ended before the outage"
    postgres.stop()
    time.sleep(6)
    postgres.start()
    code, err = finish(run)
    assert code == 0, err
    assert "unreachable" in err, "the workers noticed the outage"
    store = Store(out, "tiny", maximize=True, create=False, storage_url=url)
    assert results(store) == clean
    workers = {t.user_attrs["worker"] for t in store.trials(states=(TrialState.COMPLETE,))}
    assert len(workers) == 2, "both workers trained trials"


def test_fault_campaign(study_path: Path, tmp_path: Path, postgres, clean):
    """4 workers from the database alone; 20 SIGKILLs at random moments; nothing lost. On a
    machine fast enough to finish the study before the 20th kill, the campaign goes on in a
    fresh database, each study checked on its own: the kills, not the machine, set its length."""
    rng = random.Random(7)
    kills = rounds = 0
    deadline = time.time() + 600  # bounded in time, whatever happens
    while kills < 20 and time.time() < deadline:
        url = postgres.new_database()
        store = create_study(study_path, tmp_path / f"origin-{rounds}", url, lease=60,
                             max_attempts=50)
        made = _kill_workers(url, tmp_path / f"worker-{rounds}", store, 20 - kills, deadline,
                             rng)
        assert results(store) == clean
        latest = store.latest_by_key().values()
        assert {status for status, _, _ in latest} == {"complete"}
        reruns = sum(attempts - 1 for _, _, attempts in latest)
        # a victim may finish its trial between the look at the leases and the kill
        assert made * 3 // 4 <= reruns <= made, f"{reruns} reruns after {made} kills mid-trial"
        kills, rounds = kills + made, rounds + 1
    assert kills == 20, f"{kills} kills in 600 s"


def _kill_workers(url: str, folder: Path, store: Store, wanted: int, deadline: float,
                  rng: random.Random) -> int:
    """Run the study in `url` on 4 workers, SIGKILLing one mid-trial at random moments (and
    starting another) until `wanted` kills or the study ends; returns the kills made."""
    def start() -> subprocess.Popen:
        return lorasweep("worker", str(folder), "--storage", url, "--study", "tiny",
                         "--threads", "1", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    workers = [start() for _ in range(4)]
    kills = 0
    while kills < wanted and time.time() < deadline and any(w.poll() is None for w in workers):
        time.sleep(rng.uniform(0.05, 0.6))
        alive = [w for w in workers if w.poll() is None]
        busy = {lease.worker for lease in store.leases()}
        training = [w for w in alive if f"{os.uname().nodename}:{w.pid}" in busy]
        if not training:  # a kill between trials costs nothing; the campaign aims mid-trial
            continue
        victim = rng.choice(training)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        workers[workers.index(victim)] = start()
    for worker in workers:
        worker.wait(timeout=300)
    return kills


def test_frozen_worker_loses_its_trial_and_records_nothing(study_path: Path, tmp_path: Path,
                                                           clean):
    """A worker stopped (SIGSTOP) past its lease: another takes the trial over; when the frozen
    one wakes up and finishes, its result is not recorded a second time."""
    out = tmp_path / "study"
    frozen = lorasweep("run", str(study_path), "--out", str(out), "--threads", "1",
                       "--lease-seconds", "6")
    store = None
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "optuna.journal").exists():
            store = store or Store(out, "tiny", maximize=True, create=False)
            if store.leases():
                break
        time.sleep(0.2)
    frozen.send_signal(signal.SIGSTOP)
    taken = store.leases()[0].grid_id
    try:
        time.sleep(7)  # past the lease
        status = subprocess.run([sys.executable, "-m", "lorasweep.cli", "status", str(out)],
                                env=ENV, capture_output=True, text=True)
        assert f"running trial {taken}: STALE: silent for" in status.stdout, status.stdout
        assert f"{os.uname().nodename}:{frozen.pid}" in status.stdout
        code, err = finish(lorasweep("worker", str(out), "--threads", "1"))
        assert code == 0, err
    finally:
        frozen.send_signal(signal.SIGCONT)
    code, err = finish(frozen)
    assert code == 0, err
    assert results(store) == clean
    rows = {int(t.user_attrs["grid_id"]): n for _, t, n in store.latest_by_key().values()}
    assert rows[taken] == 2, "the frozen worker's trial ran again"


def test_full_disk_is_one_line_and_loses_nothing(study_path: Path, tmp_path: Path, clean):
    """The journal cannot grow (a file-size limit stands in for a full disk): one clear line,
    exit 2, the journal still reads, and the next run completes the study."""
    out = tmp_path / "study"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    code, err = finish(lorasweep("run", str(study_path), "--out", str(out), "--threads", "1",
                                 preexec_fn=small_files))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lorasweep: error: ") and "cannot write the study's records" in last
    store = Store(out, "tiny", maximize=True, create=False)
    recorded = results(store)
    assert 0 < len(recorded) < len(clean)
    code, err = finish(lorasweep("run", str(study_path), "--out", str(out), "--threads", "1"))
    assert code == 0, err
    assert results(Store(out, "tiny", maximize=True, create=False)) == clean


def test_each_worker_takes_one_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert gpu_assignment("cuda", 3) == ["2", "5", "2"]
    assert gpu_assignment("cuda:1", 2) == [None, None], "an indexed device is shared"
    assert gpu_assignment("cpu", 2) == [None, None]
    assert worker_threads(2, None) == max(1, (os.cpu_count() or 1) // 2)


def test_storage_password_stays_in_memory(study_path: Path, tmp_path: Path, postgres):
    """A password in --storage reaches the database for the whole run (the final status too)
    and never the study folder."""
    secret = "pw-s3cret"
    url = postgres.new_database(password=secret)
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, "-m", "lorasweep.cli", "run", str(study_path), "--out",
                           str(out), "--threads", "1", "--storage", url, "--set",
                           "search.lr=[0.001]", "--set", "search.seeds=[0]"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 complete" in done.stdout
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"{path.name} holds the password"
    recorded = yaml.safe_load((out / "environment.json").read_text())["command"]
    assert recorded[recorded.index("--storage") + 1] == url.replace(secret, "***")


UNREACHABLE = "postgresql://me{}@127.0.0.1:1/db{}"  # port 1: nothing listens there


@pytest.mark.parametrize("storage, message, recorded", [
    ("mysql://me:s3cr3t@host/db", "mysql://me:***@host/db: not a database URL; ", None),
    ("postgresql://me:s3cr3t@127.0.0.1:port/db",
     "postgresql://me:***@127.0.0.1:port/db: not a database URL (invalid literal", None),
    (UNREACHABLE.format(":s3cr3t", ""), UNREACHABLE.format(":***", ""),
     UNREACHABLE.format("", "")),
    (UNREACHABLE.format("", "?password=s3cr3t"), UNREACHABLE.format("", "?password=***"),
     UNREACHABLE.format("", "")),
    (UNREACHABLE.format("", "?sslmode=disable&sslpassword=s3cr3t&connect_timeout=5"),
     UNREACHABLE.format("", "?sslmode=disable&sslpassword=***&connect_timeout=5"),
     UNREACHABLE.format("", "?connect_timeout=5&sslmode=disable")),  # SQLAlchemy sorts keys
])
def test_bad_or_unreachable_storage_is_one_line_without_its_secret(study_path: Path,
                                                                   tmp_path: Path, storage,
                                                                   message, recorded):
    """The secret of a --storage URL (its password in any form) is neither printed nor written
    into the folder: the error line shows it masked, storage.json keeps the URL without it."""
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, "-m", "lorasweep.cli", "run", str(study_path),
                           "--out", str(out), "--storage", storage, "--patience", "1"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    if recorded is not None:
        message += ": unreachable for 1 s"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lorasweep: error: --storage {message}"), done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr, "the password is never printed"
    written = [path for path in out.rglob("*") if path.is_file()]
    assert all(b"s3cr3t" not in path.read_bytes() for path in written), "nor written"
    if recorded is not None:  # the folder was prepared: it says where the study lives
        assert {path.name for path in written} >= {"storage.json", "runs.jsonl"}
        assert json.loads((out / "storage.json").read_text()) == {"storage": recorded}
