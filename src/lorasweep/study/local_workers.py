"""`lorasweep run --workers N`: N worker processes on this machine sharing one study's store.

Each worker is an ordinary `lorasweep worker` process, exactly what a user would start by hand on
another machine, so one code path serves one laptop and a rack. Workers split the CPU cores
between them, or take one GPU each when the device is `cuda`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from lorasweep.errors import EXIT_BAD_INPUT, StudyError
from lorasweep.study.defaults import STORAGE_ENV
from lorasweep.study.options import WorkOptions
from lorasweep.study.progress import RunProgress
from lorasweep.study.store import Store

PROGRESS_SECONDS = 2.0


def worker_threads(count: int, threads: int | None) -> int:
    """CPU threads per worker: the cores shared out, so workers do not fight over them."""
    return threads or max(1, (os.cpu_count() or 1) // count)


def gpu_assignment(device: str, count: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker: one GPU each, round robin, for device `cuda`.

    A device with an index (`cuda:1`) puts every worker on that one GPU.
    """
    if device != "cuda":
        return [None] * count
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = ([g.strip() for g in visible.split(",") if g.strip()] if visible
            else [str(i) for i in range(torch.cuda.device_count())])
    return [gpus[i % len(gpus)] for i in range(count)]


def run_local_workers(store: Store, folder: Path, count: int, options: WorkOptions,
                      threads: int | None, storage_url: str | None) -> tuple[int, int]:
    """Start `count` workers on the study in `folder`, wait for them; (trained, failed)."""
    before = _finished(store)
    base_env = {**os.environ, "TQDM_DISABLE": "1"}  # one progress display, this one's
    if storage_url is not None:
        base_env[STORAGE_ENV] = storage_url  # the password stays off the command line
    command = [sys.executable, "-m", "lorasweep.cli", "worker", str(folder),
               "--device", options.device, "--max-group", str(options.max_group or "auto"),
               "--patience", str(options.patience),
               "--threads", str(worker_threads(count, threads))]
    if options.memory_limit is not None:
        command += ["--memory-limit", str(options.memory_limit)]
    processes = []
    for gpu in gpu_assignment(options.device, count):
        env = base_env if gpu is None else {**base_env, "CUDA_VISIBLE_DEVICES": gpu}
        processes.append(subprocess.Popen(command, env=env))
    progress = RunProgress(f"{count} workers", len(store.latest_by_key()), sum(before.values()))
    try:
        while any(p.poll() is None for p in processes):
            time.sleep(PROGRESS_SECONDS)
            progress.set_done(sum(_finished(store).values()), len(store.latest_by_key()))
    except KeyboardInterrupt:
        for process in processes:  # they record their trials as interrupted, then stop
            process.wait()
        raise
    finally:
        progress.close()
    codes = [p.returncode for p in processes]
    unfinished = _unfinished(store)
    for number, code in enumerate(codes, start=1):
        if code < 0:  # killed by a signal: its trials went back to the queue for the others
            taken_over = "" if unfinished else "; the others finished its trials"
            print(f"lorasweep: worker {number} of {count} was killed "
                  f"({_signal_name(-code)}){taken_over}", file=sys.stderr)
    if EXIT_BAD_INPUT in codes:
        raise StudyError(f"worker {codes.index(EXIT_BAD_INPUT) + 1} of {count} stopped on bad "
                         "input (its message is above); what was recorded is kept")
    after = _finished(store)
    trained = sum(after.values()) - sum(before.values())
    if unfinished:
        print(f"lorasweep: {unfinished} trials did not finish (worker exit codes {codes}); "
              "run the same command again to resume", file=sys.stderr)
    return trained, after["failed"] - before["failed"] + unfinished


def _unfinished(store: Store) -> int:
    return len(store.latest_by_key()) - sum(_finished(store).values())


def _finished(store: Store) -> Counter:
    statuses = Counter(status for status, _, _ in store.latest_by_key().values())
    return Counter({s: statuses[s] for s in ("complete", "diverged", "pruned", "failed")})


def _signal_name(number: int) -> str:
    """SIGKILL, SIGTERM, ...; real-time signals have no name of their own."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
