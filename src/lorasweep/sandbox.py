"""Run model-written Python in a contained child process, one process per sample.

Running code a model wrote is dangerous (it may loop, fork, eat memory, write files or open
sockets), so it runs only behind an explicit opt-in (`require_opt_in`) and only here. Each sample:

- runs in its own process with a hard wall-clock timeout; the whole process tree is killed;
- has resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size
  (RLIMIT_FSIZE), processes of its user (RLIMIT_NPROC);
- runs under a Python audit hook that refuses writes and file-system changes outside its working
  directory, sockets, subprocesses, fork/exec and ctypes (the only layer where Linux namespaces
  are not available: see `isolation()`);
- when the `unshare` tool works (root on Linux), also runs in new network, mount and PID
  namespaces as the unprivileged user `nobody`: no network interface but a down loopback, a fresh
  tmpfs on /tmp, /var/tmp and /dev/shm (its working directory is the private /tmp, gone when it
  exits), every process of the sample killed with it, and no write permission anywhere else a
  root-owned file system denies to `nobody`. These hold even against native code that slips past
  the audit hook.

Not contained: reading world-readable files (the sample can read what `nobody` can read), and
CPU-time or memory pressure up to the limits. Without namespaces (`isolation() == "audit-hook"`),
network and write blocking rest on the audit hook alone, which native code could bypass.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorasweep.errors import StudyError

OPT_IN_ENV = "LORASWEEP_ALLOW_CODE_EXECUTION"
NOBODY = 65534
OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr a sample may write (RLIMIT_FSIZE)

# Runs first inside the child: reads the program from stdin, installs the audit hook, runs it.
# Exit status 0 means the program ran to the end without an exception.
_HARNESS = r"""
import os, sys
WORK = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
DENIED = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
          "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
          "os.forkpty", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
          "ctypes.call_function"}
PATH_CHANGES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
                "shutil.move", "shutil.copyfile", "os.chdir", "os.chroot"}
def inside(path):
    if isinstance(path, int):
        return True
    return os.path.realpath(os.fsdecode(path)).startswith(WORK + os.sep)
def hook(event, args):
    if event in DENIED:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writes and path is not None and not inside(path):
            raise PermissionError("sandbox: writing outside the working directory")
    elif event in PATH_CHANGES:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not all(inside(p) for p in paths):
            raise PermissionError("sandbox: " + event + " outside the working directory")
program = sys.stdin.read()
sys.addaudithook(hook)
exec(compile(program, "<sample>", "exec"), {"__name__": "__main__"})
"""

# Inside the namespaces (as root there): private tmpfs mounts, then drop to nobody and run.
_NAMESPACE_SCRIPT = (
    "set -e; for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o size=64m,mode=1777 tmpfs $d; "
    "done; mkdir -m 700 /tmp/work; chown {uid}:{uid} /tmp/work; cd /tmp/work; "
    'exec setpriv --reuid={uid} --regid={uid} --clear-groups -- "$@"'
)


@dataclass(frozen=True)
class Limits:
    """Per-sample limits: wall seconds, CPU seconds, address space, processes of its user."""

    timeout: float = 5.0
    memory_bytes: int = 1 << 30
    processes: int = 16


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: <last line of stderr>"


def require_opt_in(study_flag: bool) -> None:
    """Refuse to run model-written code unless the study file and the environment both ask."""
    if not study_flag:
        raise StudyError("task.execute_code: scoring code runs model-written programs; set "
                         f"task.execute_code: true and {OPT_IN_ENV}=1 to allow it")
    if os.environ.get(OPT_IN_ENV) != "1":
        raise StudyError(f"task.execute_code is true but {OPT_IN_ENV}=1 is not set in the "
                         "environment: model-written code runs only with both")


@functools.cache
def isolation() -> str:
    """'namespaces' when unshare can make network, mount and PID namespaces here, else
    'audit-hook' (limits and the in-process hook only)."""
    tools = shutil.which("unshare") and shutil.which("setpriv")
    if not tools or os.geteuid() != 0:
        return "audit-hook"
    probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "true"],
                           capture_output=True, timeout=30, check=False)
    return "namespaces" if probe.returncode == 0 else "audit-hook"


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run a Python program in the sandbox; it passes if it exits 0 within the limits."""
    # The interpreter itself, not a venv's link to it: a venv under /tmp would be hidden by the
    # private /tmp mount. With -I -S the sample sees the standard library only either way.
    python = [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", _HARNESS]
    namespaced = isolation() == "namespaces"
    with tempfile.TemporaryDirectory(prefix="lorasweep-sample-") as temp:
        work = Path(temp) / "work"
        work.mkdir()
        if namespaced:
            script = _NAMESPACE_SCRIPT.format(uid=NOBODY)
            command = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child",
                       "sh", "-c", script, "sh", *python]
        else:
            command = python
        with open(Path(temp) / "output", "w+b") as output:
            process = subprocess.Popen(
                command, cwd=work, stdin=subprocess.PIPE, stdout=output, stderr=output,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
                preexec_fn=functools.partial(_set_limits, limits))
            try:
                process.communicate(program.encode(), timeout=limits.timeout)
                result = None
            except subprocess.TimeoutExpired:
                result = "timed out"
            finally:
                _kill_tree(process)
            output.seek(0)
            tail = output.read()[-2000:].decode(errors="replace").strip().splitlines()
    if result is None:
        result = "passed" if process.returncode == 0 else (
            "failed: " + (tail[-1] if tail else f"exit status {process.returncode}"))
    return Outcome(passed=result == "passed", result=result)


def _set_limits(limits: Limits) -> None:
    """In the child before exec: the limits it and everything it starts inherit."""
    cpu = int(limits.timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill the sample's session (and, with --kill-child, its PID namespace) and reap it."""
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    process.wait()
