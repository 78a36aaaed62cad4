"""What each worker's start costs, per way of starting it: from the launch to the worker's
first claim of a trial, on the built-in quickstart study (MiniLM, its data tokenized, the study
checked), in rounds taken in turn so that the machine's load falls on each alike.

- plain: `lorasweep worker DIR` on the folder's journal file (what `run --workers N` starts);
- postgresql: the same worker on a PostgreSQL study (`worker --storage URL --study NAME`);
- slurm: `sbatch` of the batch script `lorasweep slurm` writes (a 1-task array) to the task's
  worker's first claim: SLURM's scheduling and launch on top of the worker's own start.

PostgreSQL and SLURM are the tests' own throwaway servers (tests/postgres_server.py,
tests/slurm_cluster.py: root, Debian's packages); a way whose parts are missing is left out.

    .venv/bin/python benchmarks/worker_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optuna.trial import TrialState

from lorasweep.config import BUILTIN_STUDIES_DIR, load_study
from lorasweep.study import slurm
from lorasweep.study.folder import cpu_model
from lorasweep.study.options import WorkOptions
from lorasweep.study.runner import start_study
from lorasweep.study.store import Store
from tests.system_parts import missing_reason, postgres_bindir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def first_claim(store: Store, since: float, timeout: float = 300) -> float:
    """The time of the first claim made after `since` (its heartbeat, set as it claims)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        claims = [float(t.user_attrs["heartbeat"]) for t in store.trials((TrialState.RUNNING,))
                  if float(t.user_attrs.get("heartbeat", 0)) > since]
        if claims:
            return min(claims)
        time.sleep(0.05)
    raise TimeoutError("no worker claimed a trial")


def worker_round(store: Store, command: list[str], env: dict[str, str]) -> float:
    started = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        return first_claim(store, started) - started
    finally:
        process.send_signal(signal.SIGTERM)  # it gives its trial back
        process.wait()


def slurm_round(store: Store, cluster, script: Path) -> float:
    started = time.time()
    job = cluster.run("sbatch", "--parsable", str(script)).stdout.strip()
    try:
        return first_claim(store, started) - started
    finally:
        cluster.run("scancel", job)
        while cluster.run("squeue", "--noheader").stdout.strip():
            time.sleep(0.2)


def study_store(folder: Path, url: str | None) -> Store:
    study = load_study(BUILTIN_STUDIES_DIR / "quickstart.yaml")
    _, store, _ = start_study(study, folder, WorkOptions(), storage_url=url,
                              max_attempts=1000)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="worker-start-"))
    python = [sys.executable, "-m", "lorasweep.cli", "worker"]
    ways: dict[str, Callable[[], float]] = {}
    stops: list[Callable[[], None]] = []

    folder = root / "plain"
    plain = study_store(folder, None)
    ways["plain"] = lambda: worker_round(plain, [*python, str(folder), "--threads", "2"], ENV)

    if missing_reason("postgresql") is None:
        from tests.postgres_server import PostgresServer

        server = PostgresServer(postgres_bindir())
        server.start()
        stops.append(server.remove)
        url = server.new_database()
        database = study_store(root / "pg", url)
        ways["postgresql"] = lambda: worker_round(
            database, [*python, str(root / "pg-worker"), "--storage", url, "--study",
                       "quickstart", "--threads", "2"], ENV)

    if all(missing_reason(p) is None for p in ("slurm-wlm", "munge")) and os.geteuid() == 0:
        from tests.slurm_cluster import SlurmCluster

        cluster = SlurmCluster()
        cluster.start()
        stops.append(cluster.stop)
        worker = [*python, str(folder), "--threads", "2"]
        script = root / "worker.sbatch"
        script.write_text(slurm.batch_script(slurm.slurm_job("1"), "quickstart", worker, root))
        os.environ.update({"SLURM_CONF": str(cluster.conf), **ENV})  # sbatch exports it
        ways["slurm"] = lambda: slurm_round(plain, cluster, script)

    try:
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                times[name].append(way())
    finally:
        for stop in stops:
            stop()
    print(f"{cpu_model()}, {os.cpu_count()} cores, {args.rounds} rounds, quickstart (MiniLM)")
    print("| way | launch to first claim (median) | rounds |")
    print("|---|---|---|")
    for name, values in times.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.1f} s | {rounds} |")


if __name__ == "__main__":
    main()
