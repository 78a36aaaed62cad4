"""The code sandbox against escapes that an in-process audit hook does not stop: each must leave
no trace on the host, run as root (the sample runs as nobody) and as a non-root user (the
sample runs in a user namespace), and model-written code is refused where no OS sandbox works."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyseccomp
import pytest

from lorasweep.errors import StudyError
from lorasweep.sandbox import (
    OPT_IN_ENV,
    UNSAFE_ENV,
    Limits,
    require_opt_in,
    run_program,
)

from .conftest import need_part

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
# The system interpreter: a non-root user may not reach the venv's (it can live under /root).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
AS_NOBODY = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
             "--clear-groups", "--"]
SOCKET_FILE = "listening.sock"  # a Unix socket on the host that any user may connect to
# Removes the audit hook from inside: gc finds the hook function, its code is replaced.
DISARM = ("import gc\nfor f in gc.get_objects():\n"
          "    if type(f).__name__ == 'function' and f.__name__ == 'hook':\n"
          "        f.__code__ = (lambda event, args: None).__code__\n")


def escapes(host: Path, lock: Path, marker: str, port: int) -> dict[str, str]:
    """Programs that each try to leave a trace on the host, and fail if they cannot (but the
    daemon's, whose trace is a process); {PARENT} is the pid of the process that runs them."""
    return {
        "hook removed, os.system": DISARM + (
            f"import os\nassert os.system('touch {host}/system {lock}') == 0"),
        "os.open dir_fd": (f"import os\nfd = os.open({str(host)!r}, os.O_RDONLY)\n"
                           "os.close(os.open('dirfd', os.O_CREAT | os.O_WRONLY, dir_fd=fd))"),
        "os.rename dst_dir_fd": (f"import os\nopen('r', 'w').close()\n"
                                 f"fd = os.open({str(host)!r}, os.O_RDONLY)\n"
                                 "os.rename('r', 'renamed', dst_dir_fd=fd)"),
        "mkfifo": f"import os\nos.mkfifo({str(host / 'fifo')!r})",
        "mknod": f"import os\nos.mknod({str(host / 'node')!r})",
        "sqlite3 outside": (f"import sqlite3\nsqlite3.connect({str(host / 'db')!r})"
                            ".execute('create table t (x)')"),
        "pidfd_send_signal to the parent": (
            "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({PARENT}), "
            "signal.SIGKILL)"),
        "remount read-write in a new user namespace": DISARM + (
            "import subprocess\nsubprocess.run(['unshare', '--user', '--map-root-user', "
            f"'--mount', 'sh', '-ec', 'mount --bind {host} {host}; "
            f"mount -o remount,rw,bind {host}; touch {host}/remounted'], check=True)"),
        "TCP to the host's loopback": DISARM + (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"),
        "the host's abstract Unix socket": DISARM + (
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\n"
            f"s.connect({chr(0) + marker!r})"),
        "a host Unix socket file anyone may write": DISARM + (
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\n"
            f"s.connect({str(host / SOCKET_FILE)!r})"),
        "setsid daemon": DISARM + (
            "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n"
            "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
            f"{marker!r}])\ntime.sleep(0.3)\n"),
    }


# Runs the escapes (JSON on argv) as the user it is started as; prints each outcome.
HELPER = """
import json, os, sys
from lorasweep.sandbox import run_program
for name, code in json.loads(sys.argv[1]).items():
    outcome = run_program(code.replace("{PARENT}", str(os.getpid())))
    print(json.dumps([name, outcome.result]), flush=True)
"""


@pytest.fixture
def host():
    """A world-writable host directory outside every directory the sandbox replaces, a
    /run/lock path (world-writable on the host), a marker for daemon command lines (also the
    name of a listening abstract Unix socket), and a listening TCP port on the loopback."""
    directory = Path(tempfile.mkdtemp(prefix=".sandbox-probe-", dir=REPO))
    directory.chmod(0o1777)
    lock = Path("/run/lock") / f"lorasweep-escape-{uuid.uuid4().hex}"
    marker = f"lorasweep-daemon-{uuid.uuid4().hex}"
    tcp = socket.socket()
    unix, unix_file = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    tcp.bind(("127.0.0.1", 0))
    unix.bind("\0" + marker)
    unix_file.bind(str(directory / SOCKET_FILE))
    (directory / SOCKET_FILE).chmod(0o777)
    listeners = (tcp, unix, unix_file)
    for listener in listeners:
        listener.listen()
        listener.setblocking(False)
    try:
        yield directory, lock, marker, tcp.getsockname()[1]
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()  # nothing connected
    finally:
        for listener in listeners:
            listener.close()
        shutil.rmtree(directory)
        lock.unlink(missing_ok=True)
        for pid in _pids_with(marker):
            os.kill(pid, 9)


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _assert_no_trace(directory: Path, lock: Path, marker: str) -> None:
    assert sorted(p.name for p in directory.iterdir()) == [SOCKET_FILE]
    assert not lock.exists()
    deadline = time.monotonic() + 5  # the namespace's processes die as its init is reaped
    while _pids_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pids_with(marker) == [], "a daemon outlived the sample"


def _nobody(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the system interpreter as nobody with lorasweep's sources on its path."""
    path = f"{REPO / 'src'}:{Path(pyseccomp.__file__).parent}"  # pure Python, any 3.x
    return subprocess.run([*AS_NOBODY, SYSTEM_PYTHON, *args], capture_output=True, text=True,
                          timeout=120, cwd="/", env={"PYTHONPATH": path, **env}, check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0 or SYSTEM_PYTHON is None,
                                reason="switching to nobody needs root and /usr/bin/python3")


@pytest.mark.usefixtures("os_sandbox")
def test_escapes_leave_no_trace(host):
    directory, lock, marker, port = host
    for name, code in escapes(directory, lock, marker, port).items():
        outcome = run_program(code.replace("{PARENT}", str(os.getpid())))
        assert name == "setsid daemon" or not outcome.passed, (name, outcome.result)
    _assert_no_trace(directory, lock, marker)


@needs_root
def test_escapes_leave_no_trace_as_a_non_root_user(host):
    """As nobody on the host (no root, so the sandbox is a user namespace): the same escapes
    fail, the process that runs them survives, and nothing is left behind."""
    need_part("bubblewrap")
    directory, lock, marker, port = host
    programs = escapes(directory, lock, marker, port)
    programs["host probe"] = host_probe(NOBODY, "/usr")
    run = _nobody(["-c", HELPER, json.dumps(programs)], {"PATH": "/usr/bin:/bin"})
    if "none works here (bwrap failed" in run.stderr:  # e.g. no user namespaces
        pytest.skip("no OS sandbox for a non-root user here: " + run.stderr.splitlines()[-1])
    assert run.returncode == 0, run.stderr  # killed by the pidfd escape otherwise
    results = dict(json.loads(line) for line in run.stdout.splitlines())
    assert list(results) == list(programs)
    assert results.pop("host probe") == "passed"
    assert all(result != "passed" for name, result in results.items()
               if name != "setsid daemon"), results
    _assert_no_trace(directory, lock, marker)


@pytest.mark.usefixtures("os_sandbox")
def test_threads_work_and_fork_bombs_stay_bounded():
    threads = ("import threading\nmet = threading.Barrier(51)\n"  # 50 threads alive at once
               "ts = [threading.Thread(target=met.wait) for _ in range(50)]\n"
               "for t in ts: t.start()\nmet.wait()\nfor t in ts: t.join()\n")
    assert run_program(threads).passed, run_program(threads).result
    bomb = DISARM + "import os\nwhile True:\n    os.fork()\n"
    assert not run_program(bomb, Limits(timeout=2)).passed


def host_probe(uid: int, prefix: str) -> str:
    """A program, without the audit hook, that passes if it sees the sandbox's view of the host
    as `uid`, run by the interpreter installed at `prefix`."""
    under_root = Path(prefix).relative_to("/root").parts[0] if prefix.startswith("/root/") else ""
    # the checkout is seen read-only, unless it lies under /tmp, which the sample's own tmpfs hides
    seen = Path("/usr") if REPO.is_relative_to("/tmp") else REPO
    return DISARM + (
        "import os, socket\n"
        "assert [name for _, name in socket.if_nameindex()] == ['lo']\n"
        "assert os.getcwd() == '/tmp' and os.listdir('/tmp') == []\n"
        f"assert os.listdir('/run') == [] and os.listdir('/root') in ([], [{under_root!r}])\n"
        "assert all(int(p) < 10 for p in os.listdir('/proc') if p.isdigit())  # its own only\n"
        f"assert os.path.isdir({str(seen)!r}) and os.getuid() == {uid}\n"
        "status = open('/proc/self/status').read()\n"
        "assert 'CapEff:\\t0000000000000000' in status and 'NoNewPrivs:\\t1' in status\n"
        "for path in ('/run/x', '/var/tmp/x', '/root/x', '/dev/x', '/dev/shm/x', "
        f"{str(seen / 'x')!r}):\n"
        "    try:\n        open(path, 'w')\n        raise SystemExit('wrote ' + path)\n"
        "    except OSError:\n        pass\n"
        "assert set(os.listdir('/dev')) <= {'null', 'zero', 'full', 'random', 'urandom', "
        "'tty', 'pts', 'ptmx', 'shm', 'stdin', 'stdout', 'stderr', 'fd', 'core'}\n"
        "open('/tmp/x', 'w').write('the working directory is writable')\n")


@pytest.mark.usefixtures("os_sandbox")
def test_the_host_is_read_only_and_private_dirs_are_fresh():
    probe = host_probe(NOBODY if os.geteuid() == 0 else os.geteuid(), sys.base_prefix)
    assert run_program(probe).passed, run_program(probe).result


@needs_root
def test_no_sandbox_is_refused_without_the_unsafe_opt_in():
    """A non-root user where bwrap is missing: one line naming why, unless the unsafe opt-in."""
    call = ("from lorasweep.sandbox import run_program\n"
            "print(run_program('import os; os.mkfifo(\"/proc/no\")').result)")
    refused = _nobody(["-c", call], {"PATH": "/nonexistent"})
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("lorasweep.errors.StudyError: model-written code runs only inside an "
                           "OS sandbox, and none works here (bubblewrap (bwrap) is not installed)")
    assert UNSAFE_ENV in last
    unsafe = _nobody(["-c", call], {"PATH": "/nonexistent", UNSAFE_ENV: "1"})
    assert unsafe.returncode == 0, unsafe.stderr
    assert unsafe.stdout.startswith("failed: ") and "WITHOUT an OS sandbox" in unsafe.stderr


def test_refusal_is_one_study_error(monkeypatch):
    monkeypatch.setattr("lorasweep.sandbox.unavailable_reason", lambda: "why")
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(StudyError, match=rf"none works here \(why\); set {UNSAFE_ENV}=1"):
        run_program("pass")
    monkeypatch.setenv(OPT_IN_ENV, "1")
    with pytest.raises(StudyError, match=r"none works here \(why\)"):
        require_opt_in(True)  # before anything trains
