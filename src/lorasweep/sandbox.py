"""Run model-written Python in a contained child process, one process per sample.

Running code a model wrote is dangerous (it may loop, fork, eat memory, write files, open
sockets or attack the process that started it), so it runs only behind an explicit opt-in
(`require_opt_in`), only here, and only behind a boundary the kernel enforces: an in-process
Python hook can be removed by the code it watches (through `gc`, or native code), so it is not
the boundary. Each sample runs under bubblewrap (`bwrap`) in new mount, PID, network, IPC and
UTS namespaces:

- the host file system is visible read-only (every mount, recursively, nosuid and nodev); the
  home directories /root and /home are hidden (the Python install is bound back read-only);
  /tmp is a fresh 64 MiB tmpfs, the sample's working directory, gone when it exits; /var/tmp
  and /run are fresh tmpfs mounts that it cannot write; /dev is a minimal read-only one (null,
  zero, full, random, urandom, tty, a private pts) and /proc shows only the sample's own processes;
- no network: its namespace has only a loopback interface that is down; abstract Unix sockets
  of the host are in another network namespace;
- as root it runs as the user `nobody` with no capabilities and no_new_privs; as any other user,
  inside a new user namespace as that user, with no capabilities and no further user namespaces;
- bwrap is started as the leader of its own session and `--die-with-parent`: killing it kills
  the PID namespace's init, and with it every process of the sample (setsid daemons included);
- a seccomp filter (DENIED_SYSCALLS): no Unix sockets (host socket files stay reachable through
  read-only mounts), new namespaces, mounts, io_uring, kernel keys, BPF, perf events,
  userfaultfd or ptrace;
- resource limits: CPU seconds, address space, file size, and processes and threads of its user
  (RLIMIT_NPROC, set inside the sample, where a new user namespace counts only its own);
- a hard wall-clock timeout;
- the audit hook stays as an extra layer (it refuses sockets, subprocesses, fork/exec, ctypes
  and writes outside the working directory), not as the boundary.

Where bwrap cannot set this up (not installed, as root no setpriv, user namespaces disabled for
a non-root user, no libseccomp),
model-written code is refused with one line naming why, unless UNSAFE_ENV=1 asks to run it with
only the limits and the hook (which a hostile program can remove).

Not contained: reading host files that the sample's user (nobody, or the user running
lorasweep) can read, outside the hidden directories; the system calls the filter allows; CPU
time and memory up to the limits.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorasweep.errors import StudyError

OPT_IN_ENV = "LORASWEEP_ALLOW_CODE_EXECUTION"
UNSAFE_ENV = "LORASWEEP_UNSAFE_CODE_EXECUTION"
NOBODY = 65534
OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr a sample may write (RLIMIT_FSIZE)
WORK_BYTES = 64 << 20  # size of the sample's private /tmp
HIDDEN = ("/root", "/home")  # home directories: hidden, not only read-only
PRIVATE = ("/var/tmp", "/run")  # host directories replaced by empty tmpfs mounts
# System calls a sample never needs, refused (EPERM) by a seccomp filter to shrink the kernel's
# surface: new namespaces, mounts, io_uring (whose operations seccomp does not see), kernel keys,
# BPF, perf events, userfaultfd and ptrace. Unix sockets (socket files of the host stay reachable
# through read-only mounts) and clone with CLONE_NEWUSER are refused too.
DENIED_SYSCALLS = ("unshare", "setns", "mount", "umount2", "pivot_root", "move_mount",
                   "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
                   "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
                   "request_key", "bpf", "perf_event_open", "userfaultfd", "ptrace")
CLONE_NEWUSER = 0x10000000
# The sample's whole environment. Two malloc arenas: glibc otherwise reserves 64 MiB of address
# space per thread, and a few dozen threads would exhaust the address-space limit.
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MALLOC_ARENA_MAX": "2"}

# Runs first inside the child: limits its processes, reads the program from stdin, installs the
# audit hook (an extra layer only), runs it. Exit status 0 means it ran without an exception.
_HARNESS = r"""
import os, resource, sys
NPROC = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
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


@dataclass(frozen=True)
class Limits:
    """Per-sample limits: wall seconds, CPU seconds, address space, and processes plus threads
    (RLIMIT_NPROC counts both: large enough for a threaded sample, small enough to stop a fork
    bomb, which the PID namespace also ends with the sample)."""

    timeout: float = 5.0
    memory_bytes: int = 1 << 30
    processes: int = 256


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: <last line of stderr>"


def require_opt_in(study_flag: bool) -> None:
    """Refuse to run model-written code unless the study file and the environment both ask,
    and an OS sandbox works here (or the unsafe opt-in is given)."""
    if not study_flag:
        raise StudyError("task.execute_code: scoring code runs model-written programs; set "
                         f"task.execute_code: true and {OPT_IN_ENV}=1 to allow it")
    if os.environ.get(OPT_IN_ENV) != "1":
        raise StudyError(f"task.execute_code is true but {OPT_IN_ENV}=1 is not set in the "
                         "environment: model-written code runs only with both")
    require_sandbox()


def require_sandbox() -> None:
    """Raise one line naming why when no OS sandbox works here and UNSAFE_ENV is not 1."""
    reason = unavailable_reason()
    if reason is not None and os.environ.get(UNSAFE_ENV) != "1":
        raise StudyError(
            f"model-written code runs only inside an OS sandbox, and none works here ({reason}); "
            f"set {UNSAFE_ENV}=1 to run it anyway with only resource limits and an in-process "
            "audit hook, which hostile code can remove")


def _python() -> list[str]:
    """The interpreter itself (not a venv's link to it), isolated: standard library only."""
    return [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", _HARNESS]


@functools.cache
def _bwrap() -> tuple[list[str], list[str]] | None:
    """The bwrap command line that the interpreter runs under, split where the seccomp option
    goes, or None when bwrap (or, as root, setpriv) is missing."""
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if bwrap is None or (os.geteuid() == 0 and setpriv is None):
        return None
    command = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--ro-bind", "/", "/"]
    empty = [path for path in HIDDEN + PRIVATE if os.path.isdir(path)]
    for path in empty:
        command += ["--size", "1048576", "--tmpfs", path]
    command += ["--perms", "1777", "--size", str(WORK_BYTES), "--tmpfs", "/tmp"]
    for path in {sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}:
        command += ["--ro-bind", path, path]  # the interpreter, if it was under a hidden path
    for path in empty:  # in a user namespace the sample would own them
        command += ["--remount-ro", path]
    command += ["--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc", "--chdir", "/tmp"]
    if os.geteuid() == 0:  # root keeps its capabilities in bwrap only to drop to nobody
        return command, [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"]
    return command, ["--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--"]


@functools.cache
def _seccomp_program() -> bytes:
    """The compiled seccomp filter: every system call allowed but DENIED_SYSCALLS (libseccomp
    compiles it for this machine's architecture and refuses other ABIs)."""
    import pyseccomp

    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    rules.add_rule(pyseccomp.ERRNO(errno.EACCES), "socket",
                   pyseccomp.Arg(0, pyseccomp.EQ, socket.AF_UNIX))
    rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "clone",
                   pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")  # flags out of reach: C libraries
    for name in DENIED_SYSCALLS:                              # then fall back to clone
        rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    with tempfile.TemporaryFile() as compiled:
        rules.export_bpf(compiled)
        compiled.seek(0)
        return compiled.read()


@functools.cache
def unavailable_reason() -> str | None:
    """None when the OS sandbox works here (probed once by running the interpreter in it),
    else why not, in a few words."""
    if _bwrap() is None:
        return "bubblewrap (bwrap) is not installed" if shutil.which("bwrap") is None else \
            "setpriv (util-linux) is not installed"
    try:
        _seccomp_program()
    except (ImportError, OSError, RuntimeError) as error:
        return f"no seccomp filter (libseccomp through pyseccomp): {error}"
    returncode, tail = _execute("", Limits(timeout=30), sandboxed=True)
    return None if returncode == 0 else "bwrap failed: " + (tail or f"exit status {returncode}")


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run a Python program in the sandbox; it passes if it exits 0 within the limits."""
    require_sandbox()
    sandboxed = unavailable_reason() is None
    if not sandboxed:
        _warn_unsafe()
    returncode, tail = _execute(program, limits, sandboxed)
    if returncode is None:
        return Outcome(passed=False, result="timed out")
    if returncode == 0:
        return Outcome(passed=True, result="passed")
    return Outcome(passed=False, result="failed: " + (tail or f"exit status {returncode}"))


def _execute(program: str, limits: Limits, sandboxed: bool) -> tuple[int | None, str]:
    """Run the harness on `program`, in the sandbox or not: its exit status (None when it
    timed out) and the last line it wrote."""
    command = [*_python(), str(limits.processes)]
    with tempfile.TemporaryDirectory(prefix="lorasweep-sample-") as temp, \
            open(Path(temp) / "output", "w+b") as output, contextlib.ExitStack() as stack:
        work = Path(temp) / "work"  # the working directory without the sandbox only
        work.mkdir()
        kept = ()
        if sandboxed:  # bwrap reads the filter from this descriptor before the sample starts
            (Path(temp) / "filter").write_bytes(_seccomp_program())
            kept = (stack.enter_context(open(Path(temp) / "filter", "rb")).fileno(),)
            head, tail = _bwrap()
            command = [*head, "--seccomp", str(kept[0]), *tail, *command]
        process = subprocess.Popen(
            command, cwd=work, stdin=subprocess.PIPE, stdout=output, stderr=output, env=ENV,
            start_new_session=True, pass_fds=kept,
            preexec_fn=functools.partial(_set_limits, limits))
        try:
            process.communicate(program.encode(), timeout=limits.timeout)
            returncode = process.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _kill_tree(process)
        output.seek(0)
        lines = output.read()[-2000:].decode(errors="replace").strip().splitlines()
    return returncode, lines[-1] if lines else ""


@functools.cache
def _warn_unsafe() -> None:
    """Say once, on stderr, that the unsafe opt-in is in use."""
    print(f"lorasweep: {UNSAFE_ENV}=1: running model-written code WITHOUT an OS sandbox "
          f"({unavailable_reason()}): only resource limits and an audit hook", file=sys.stderr)


def _set_limits(limits: Limits) -> None:
    """In the child before exec: the limits it and everything it starts inherit (RLIMIT_NPROC
    is set by the harness, inside the sandbox's user namespace where it has one)."""
    cpu = int(limits.timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill the sample's session: bwrap, whose death (--die-with-parent) kills the PID
    namespace's init and so every process in it; then reap it."""
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    process.wait()
