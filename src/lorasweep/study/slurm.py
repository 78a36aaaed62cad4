"""`lorasweep slurm`: N workers of one study as a SLURM job array, from one command.

Plain `sbatch`, not submitit: each array task runs the very `lorasweep worker` command a
person would start by hand on another machine (one code path for a laptop, a rack and a
cluster), from a batch script written into the study folder that can be read, kept and
resubmitted with `sbatch` alone; nothing is pickled, and no package beyond lorasweep is needed.
What submitit adds, a requeue at the time limit, is a few lines of the script: SLURM warns the
batch shell GRACE_SECONDS before the limit (`--signal=B:USR1@...`), the shell stops its worker
and requeues its own task. Preemption requeues the task through `--requeue`. Either way the
worker gets SIGTERM, ends its lease on the trials it ran (study/runner: Terminated), and the
store's lease rules run them again elsewhere, each loss counted toward --max-attempts, so a
trial is neither lost nor recorded twice.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorasweep.errors import StudyError
from lorasweep.study.defaults import STORAGE_ENV
from lorasweep.study.shared_storage import this_host

SCRIPT_NAME = "worker.sbatch"
LOG_FOLDER = "slurm"  # in the study folder: the batch script and one log per task
GRACE_SECONDS = 120  # the time limit's warning: enough to give the trials back and requeue
NAME = re.compile(r"[A-Za-z0-9_.,-]+")
TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
# sbatch options this command writes itself: the one that sets each, or why it is fixed
OWN_OPTIONS = {
    "--array": "--array N and --parallel P", "-a": "--array N and --parallel P",
    "--partition": "--partition", "-p": "--partition", "--account": "--account",
    "-A": "--account", "--time": "--time", "-t": "--time",
    "--gpus-per-task": "--gpus-per-task", "--cpus-per-task": "--cpus-per-task",
    "-c": "--cpus-per-task", "--signal": "the requeue at the time limit",
    "--requeue": "the requeue on preemption", "--no-requeue": "the requeue on preemption",
    "--ntasks": "one worker per task", "-n": "one worker per task", "--wrap": "the script",
    "--open-mode": "the logs kept over requeues", "--parsable": "reading the job id",
}


@dataclass(frozen=True)
class SlurmJob:
    """What the job array asks SLURM for (each field checked by `slurm_job`)."""

    tasks: int
    parallel: int | None = None  # at most this many tasks at once
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # SLURM's own forms: MIN, MIN:SEC, H:MIN:SEC, D-H[:MIN[:SEC]]
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)  # more sbatch options, as given

    @property
    def array(self) -> str:
        return f"0-{self.tasks - 1}" + (f"%{self.parallel}" if self.parallel else "")


def _count(flag: str, text: str | None, least: int) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < least:
        raise StudyError(f"{flag} {text}: must be a whole number of at least {least}")
    return int(text)


def _name(flag: str, text: str | None) -> str | None:
    if text is not None and not NAME.fullmatch(text):
        raise StudyError(f"{flag} {text!r}: must be a SLURM name (letters, digits, "
                         "'_', '-', '.', ',')")
    return text


def time_seconds(text: str) -> int:
    """A SLURM time limit in seconds (StudyError naming --time for any other form)."""
    found = TIME.fullmatch(text)
    if found is None or found.group(2) is None:
        raise StudyError(f"--time {text!r}: must be a SLURM time limit: MINUTES, MM:SS, "
                         "HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, first, second, third = (int(g) if g else None for g in found.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # H:M:S
        seconds = first * 3600 + second * 60 + third
    elif second is not None:  # M:S
        seconds = first * 60 + second
    else:  # M
        seconds = first * 60
    if seconds <= 0:
        raise StudyError(f"--time {text!r}: must be longer than 0")
    return seconds


def _extra(options: list[str]) -> tuple[str, ...]:
    for option in options:
        if not option.startswith("-") or any(c.isspace() for c in option):
            raise StudyError(f"--sbatch-option {option!r}: must be one sbatch option written "
                             "as one word, e.g. --sbatch-option=--mem=32G")
        flag = option.split("=", 1)[0]
        if flag in OWN_OPTIONS:
            raise StudyError(f"--sbatch-option {option}: lorasweep slurm sets {flag} itself "
                             f"({OWN_OPTIONS[flag]}); allowed: any other sbatch option")
    return tuple(options)


def slurm_job(tasks: str, parallel: str | None = None, partition: str | None = None,
              account: str | None = None, time_limit: str | None = None,
              gpus_per_task: str | None = None, cpus_per_task: str | None = None,
              extra: list[str] | None = None) -> SlurmJob:
    """The job from the command line's text, each bad value refused in one line naming it."""
    if time_limit is not None:
        time_seconds(time_limit)
    return SlurmJob(tasks=_count("--array", tasks, 1) or 1,
                    parallel=_count("--parallel", parallel, 1),
                    partition=_name("--partition", partition),
                    account=_name("--account", account), time=time_limit,
                    gpus_per_task=_count("--gpus-per-task", gpus_per_task, 0) or 0,
                    cpus_per_task=_count("--cpus-per-task", cpus_per_task, 1),
                    extra=_extra(extra or []))


def batch_script(job: SlurmJob, name: str, worker: list[str], logs: Path) -> str:
    """The batch script every task runs: one `lorasweep worker` (`worker`, its words), stopped
    cleanly and requeued at the time limit's warning, stopped cleanly when preempted or
    cancelled."""
    grace = GRACE_SECONDS
    if job.time is not None:
        grace = max(1, min(grace, time_seconds(job.time) // 2))
    own_logs = not any(o.split("=", 1)[0] in ("--output", "-o") for o in job.extra)
    options = [f"--job-name=lorasweep-{name}", f"--array={job.array}", "--ntasks=1",
               "--requeue", f"--signal=B:USR1@{grace}", "--open-mode=append",
               *([f"--output={logs / '%A_%a.out'}"] if own_logs else []),
               *([f"--partition={job.partition}"] if job.partition else []),
               *([f"--account={job.account}"] if job.account else []),
               *([f"--time={job.time}"] if job.time else []),
               *([f"--gpus-per-task={job.gpus_per_task}"] if job.gpus_per_task else []),
               *([f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []),
               *job.extra]
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        f"# Written by `lorasweep slurm` for the study {name}; `sbatch` it again to add",
        "# workers. Each task is one `lorasweep worker` on the study's shared storage.",
        "export TQDM_DISABLE=1  # a log file, not a terminal: no progress bars",
        "task=\"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"",
        "echo \"lorasweep: task $task on $(hostname), start ${SLURM_RESTART_COUNT:-0}\"",
        "# SLURM's warning before the time limit: stop the worker (its trials go back to the",
        "# queue), then requeue this task to go on where the study stands",
        "trap 'kill -TERM \"$worker\" 2>/dev/null; wait \"$worker\"; "
        "scontrol requeue \"$task\"; exit 0' USR1",
        "# preempted or cancelled: SIGTERM reaches the worker too; wait while it gives back",
        "# its trials",
        "trap 'kill -TERM \"$worker\" 2>/dev/null; wait \"$worker\"; exit 143' TERM",
        f"{shlex.join(worker)} &",
        "worker=$!",
        "wait \"$worker\"",
        "",
    ])


def cluster_nodes(partition: str | None) -> list[str] | None:
    """The nodes the job may run on (`sinfo`), or None where SLURM cannot say."""
    command = ["sinfo", "--noheader", "--Node", "--format=%N"]
    if partition:
        command.append(f"--partition={partition}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return sorted({line.strip() for line in done.stdout.splitlines() if line.strip()})


def other_nodes(partition: str | None) -> list[str]:
    """The nodes other than this machine the job may run on (none where SLURM cannot say)."""
    return [n for n in cluster_nodes(partition) or [] if n.split(".")[0] != this_host()]


def submit(script: Path, env: dict[str, str]) -> str:
    """Submit the batch script; the job's id. `env` is the environment the tasks get (sbatch
    exports it), so a storage password travels in it, never in a file."""
    if shutil.which("sbatch") is None:
        raise StudyError("sbatch: not found on this machine; run lorasweep slurm where SLURM's "
                         "commands are (a login node), or add --dry-run to see the script")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "failed").splitlines()
        raise StudyError(f"sbatch refused the job: {lines[-1]}")
    return done.stdout.strip().split(";")[0]


def job_active(job_id: str) -> bool:
    """Whether any task of the job is pending, running or being requeued."""
    done = subprocess.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%i"],
                          capture_output=True, text=True, timeout=30, check=False)
    return done.returncode == 0 and bool(done.stdout.strip())


def wait_for(job_id: str, poll: float = 2.0) -> None:
    """Return once no task of the job is left in the queue."""
    while job_active(job_id):
        time.sleep(poll)


def storage_env(env: dict[str, str], storage_url: str | None) -> dict[str, str]:
    """The tasks' environment: this one, with the full storage URL (password and all)."""
    return env if storage_url is None else {**env, STORAGE_ENV: storage_url}
