"""`lorasweep slurm`: a study's workers as a SLURM job array.

The end-to-end test runs a real single-node SLURM of its own (tests/slurm_cluster.py: munged,
slurmctld and slurmd as root, torn down after the module). A 3-task array trains a 6-trial study
while one task is cancelled mid-trial (SIGTERM, as preemption sends it) and another gets the
time limit's warning mid-trial (its batch shell requeues it); each lost trial is finished once
by a worker, and the queue is empty at the end. The rest checks the batch script and the
refusals without a cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from lorasweep.cli import main
from lorasweep.config import dump_study, load_study
from lorasweep.errors import StudyError
from lorasweep.space import expand_trials
from lorasweep.study import slurm
from lorasweep.study.backend import optuna_trial_id
from lorasweep.study.folder import open_for_running
from lorasweep.study.shared_storage import check_reachable, filesystem_type
from lorasweep.study.store import LOST_REASON, Store

from .conftest import make_records, need_part, tiny_study, wait_until, write_jsonl


@pytest.fixture(scope="module")
def cluster():
    """A SLURM cluster of this module's own (skipped where SLURM or MUNGE is missing, or this
    is not root; failed instead where the parts are required, as in .ci/run)."""
    from .slurm_cluster import SlurmCluster

    need_part("slurm-wlm")
    need_part("munge")
    if os.geteuid() != 0:
        pytest.skip("SLURM's test cluster runs its daemons as root (SlurmUser=root)")
    server = SlurmCluster()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def study_path(tmp_path: Path) -> Path:
    """Six trials (3 LRs x 2 seeds) of a few seconds each on tiny:bert."""
    data = {"train": write_jsonl(tmp_path / "train.jsonl", make_records(240, 0)),
            "test": write_jsonl(tmp_path / "test.jsonl", make_records(60, 1))}
    study = tiny_study(data, train={"steps": 40},
                       search={"methods": ["lora"], "lr": [1e-3, 1e-2, 3e-2],
                               "seeds": [0, 1]})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def task_of(worker: str) -> str | None:
    """The array task id a worker process (host:pid) runs in, from its environment."""
    pid = worker.rpartition(":")[2]
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e for e in environ if e.startswith(b"SLURM_ARRAY_TASK_ID=")]
    return found[0].split(b"=", 1)[1].decode() if found else None


def running_in_task(store: Store, exclude: set[str]) -> tuple[str, str] | None:
    """A running trial's key and its worker's task, for a task not in `exclude`."""
    for trial in store.trials(states=(TrialState.RUNNING,)):
        task = task_of(str(trial.user_attrs.get("worker", "")))
        if task is not None and task not in exclude:
            return str(trial.user_attrs["trial_key"]), task
    return None


def test_an_array_finishes_a_study_through_a_cancel_and_a_requeue(cluster, study_path: Path,
                                                                   tmp_path: Path):
    out = tmp_path / "study"
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.time()
    command = subprocess.Popen(
        [sys.executable, "-m", "lorasweep.cli", "slurm", str(study_path), "--array", "3",
         "--out", str(out), "--wait", "--lease-seconds", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = wait_until("the study", lambda: (out / "optuna.journal").exists()
                           and Store(out, "tiny", maximize=True, create=False))
        job = wait_until("the job", lambda: cluster.run(
            "squeue", "--noheader", "--format=%F").stdout.split()[:1])[0]
        # preempted or cancelled: SIGTERM to the task; its worker gives its trial back
        cancelled_key, cancelled = wait_until("a trial running in a task",
                                              lambda: running_in_task(store, set()))
        cluster.run("scancel", f"{job}_{cancelled}")
        # the time limit's warning (--signal=B:USR1@...) to another task's batch shell: it
        # stops its worker and requeues itself
        warned_key, warned = wait_until("a trial running in another task",
                                        lambda: running_in_task(store, {cancelled}))
        cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_{warned}")
        # requeued: it waits out its credential's life (slurm_cluster.CRED_EXPIRE), then runs
        wait_until("the requeued task", lambda: "BeginTime" in cluster.run(
            "squeue", "--noheader", f"--jobs={job}_{warned}", "--format=%r").stdout)
        stdout, stderr = command.communicate(timeout=150)
    finally:
        if command.poll() is None:
            command.kill()
            cluster.run("scancel", "--full", "--user=root", check=False)
    elapsed = time.time() - started
    logs = "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))
    assert command.returncode == 0, stderr + logs
    assert f"submitted job {job}: 3 workers" in stdout
    assert cluster.run("squeue", "--noheader").stdout.strip() == ""
    trials = Store(out, "tiny", maximize=True, create=False).trials()
    complete = Counter(t.user_attrs["trial_key"] for t in trials
                       if t.state == TrialState.COMPLETE)
    keys = {spec.key for spec in expand_trials(load_study(study_path))}
    assert set(complete) == keys and set(complete.values()) == {1}, complete
    for key in (cancelled_key, warned_key):  # lost once (the lease rules), then finished
        lost = [t for t in trials if t.user_attrs["trial_key"] == key
                and t.state == TrialState.FAIL]
        assert [t.user_attrs.get("reason") for t in lost] == [LOST_REASON], key
    assert f"task {job}_{warned} on {cluster.node}, start 1" in logs, logs + cluster.logs()
    assert "6 trials: 6 complete" in stdout
    print(f"3-task array, one cancel, one requeue: {elapsed:.0f} s")


def test_the_batch_script_runs_one_worker_and_requeues_itself(tmp_path: Path):
    job = slurm.slurm_job("4", "2", "gpu", "proj", "1-02:00:00", "1", "8",
                          ["--mem=32G", "--constraint=a100"])
    script = slurm.batch_script(job, "mine", ["python", "-m", "lorasweep.cli", "worker",
                                              "/shared/my study"], tmp_path)
    options = [line.split(" ", 1)[1] for line in script.splitlines()
               if line.startswith("#SBATCH ")]
    assert options == ["--job-name=lorasweep-mine", "--array=0-3%2", "--ntasks=1",
                       "--requeue", "--signal=B:USR1@120", "--open-mode=append",
                       f"--output={tmp_path}/%A_%a.out", "--partition=gpu", "--account=proj",
                       "--time=1-02:00:00", "--gpus-per-task=1", "--cpus-per-task=8",
                       "--mem=32G", "--constraint=a100"]
    assert "python -m lorasweep.cli worker '/shared/my study' &" in script
    assert "scontrol requeue" in script
    path = tmp_path / "worker.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    short = slurm.batch_script(slurm.slurm_job("1", time_limit="3"), "x", ["w"], tmp_path)
    assert "--signal=B:USR1@90" in short  # half of a short limit


@pytest.mark.parametrize(("args", "message"), [
    (["--array", "0"], "--array 0: must be a whole number of at least 1"),
    (["--array", "three"], "--array three: must be a whole number of at least 1"),
    (["--parallel", "-1"], "--parallel -1: must be a whole number of at least 1"),
    (["--gpus-per-task", "1.5"], "--gpus-per-task 1.5: must be a whole number of at least 0"),
    (["--cpus-per-task", "0"], "--cpus-per-task 0: must be a whole number of at least 1"),
    (["--time", "2h"], "--time '2h': must be a SLURM time limit: MINUTES, MM:SS"),
    (["--partition", "a b"], "--partition 'a b': must be a SLURM name"),
    (["--sbatch-option=--time=5"], "lorasweep slurm sets --time itself"),
    (["--sbatch-option=mem=4G"], "must be one sbatch option written as one word"),
    (["--storage", "sqlite:///x.db"], "a SQLite file is not for workers on many machines"),
    (["--storage", "postgresql://me@localhost/db"], "a database on this machine's own address"),
    ([], "its journal file is on a local file system"),
])
def test_bad_input_is_one_line_naming_the_option(args, message, study_path: Path,
                                                 tmp_path: Path, monkeypatch, capsys):
    """Exit 2 with one line; nothing is written or submitted. The cluster here has a node
    besides this machine, so storage only this machine reaches is refused (where this test's
    folder is on a shared file system, that case passes the check and is left out)."""
    monkeypatch.setattr(slurm, "other_nodes", lambda partition: ["node7"])
    if not args and filesystem_type(tmp_path) not in (None, "ext4", "xfs", "tmpfs", "overlay",
                                                      "btrfs"):
        pytest.skip(f"{tmp_path} is on {filesystem_type(tmp_path)}")
    argv = ["slurm", str(study_path), "--out", str(tmp_path / "out"), "--dry-run",
            *(args if args[:1] == ["--array"] else ["--array", "2", *args])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_storage_every_node_reaches_is_accepted(tmp_path: Path):
    mounts = tmp_path / "mountinfo"
    mounts.write_text("22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
                      "40 22 0:40 / /shared rw - nfs4 server:/export rw\n")
    check_reachable(None, Path("/shared/studies/mine"), ["node7"], mounts)
    check_reachable("postgresql://me@db.cluster/sweeps", tmp_path, ["node7"], mounts)
    check_reachable(None, Path("/home/me/mine"), [], mounts)  # one machine: anything goes
    with pytest.raises(StudyError, match=r"local file system \(ext4\)"):
        check_reachable(None, Path("/home/me/mine"), ["node7"], mounts)


def test_a_released_trial_is_lost_once_and_runs_again(tmp_path: Path, study_path: Path):
    """What a worker stopped by SIGTERM does with its trial: its lease ends at once, and the
    next sync closes it as lost (counted toward max_attempts) and queues it again."""
    study = load_study(study_path)
    store = open_for_running(study, tmp_path / "study")
    store.configure(dump_study(study), lease_seconds=600, max_attempts=2)
    store.sync(expand_trials(study))
    [claimed] = store.claim_group(1)
    store.release(claimed.trial_id)
    store.sync(expand_trials(study))
    status, _, attempts = store.latest_by_key()[claimed.spec.key]
    assert (status, attempts) == ("waiting", 2)
    closed = store.storage.get_trial(claimed.trial_id)
    assert closed.user_attrs["lost"] and closed.user_attrs["reason"] == LOST_REASON


def test_a_dry_run_prints_the_script_and_keeps_the_password_off_it(study_path: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch, capsys):
    """On a database, each task's worker joins the study by its name, with the URL (password
    and all) in the environment sbatch passes on, never in the script; a dry run writes
    nothing."""
    monkeypatch.setattr(slurm, "other_nodes", lambda partition: ["node7"])
    url = "postgresql://me:s3cret@db.cluster/sweeps"
    assert main(["slurm", str(study_path), "--array", "2", "--gpus-per-task", "1",
                 "--storage", url, "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "s3cret" not in script and "--study tiny --device cuda" in script
    assert "#SBATCH --array=0-1" in script and "#SBATCH --gpus-per-task=1" in script
    assert not (tmp_path / "out").exists()
    assert slurm.storage_env({"A": "1"}, url) == {"A": "1", "LORASWEEP_STORAGE": url}


def test_sigterm_gives_the_running_trial_back_at_once(study_path: Path, tmp_path: Path):
    """Without SLURM: a worker stopped by SIGTERM mid-trial says so in one line (exit 143)
    and ends its lease at once (heartbeat 0), though its lease had minutes left; the next run
    closes the trial as lost and trains it, once."""
    out = tmp_path / "study"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    run = subprocess.Popen([sys.executable, "-m", "lorasweep.cli", "run", str(study_path),
                            "--out", str(out), "--lease-seconds", "600", "--threads", "1"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        store = wait_until("the study", lambda: (out / "optuna.journal").exists()
                           and Store(out, "tiny", maximize=True, create=False), timeout=120)
        [running] = wait_until("a running trial", lambda: store.trials((TrialState.RUNNING,)),
                               timeout=120)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143
    assert err.strip().splitlines()[-1].startswith("lorasweep: stopped by SIGTERM;")
    released = store.storage.get_trial(optuna_trial_id(running))
    assert released.state == TrialState.RUNNING and released.user_attrs["heartbeat"] == 0.0
    assert main(["run", str(study_path), "--out", str(out), "--threads", "1"]) == 0
    trials = store.trials()
    key = running.user_attrs["trial_key"]
    assert [t.state for t in trials if t.user_attrs["trial_key"] == key] == [
        TrialState.FAIL, TrialState.COMPLETE]
    assert Counter(t.state for t in trials)[TrialState.COMPLETE] == 6
