"""The system packages the tests need beyond the venv, and the one line that says a missing one.

`scripts/setup.sh` runs this file (with the system's python3, before the venv exists): as root
where apt-get is, it installs what is missing; elsewhere it prints one line per missing part. The
tests that need a part skip with that same line (`conftest.need_part`), or fail with it where
REQUIRE_ENV is 1 (as `.ci/run` sets it): there set-up has installed every part, and a broken
install must not pass as skips. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REQUIRE_ENV = "LORASWEEP_REQUIRE_SYSTEM_PARTS"  # 1: a test whose part is missing fails
REQUIRE_POSTGRES_ENV = "LORASWEEP_REQUIRE_POSTGRES"  # 1: the same, for PostgreSQL only


def postgres_bindir() -> Path | None:
    """Where PostgreSQL's server programs are (initdb, pg_ctl), or None. Debian keeps them off
    PATH, in /usr/lib/postgresql/VERSION/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = shutil.which("initdb") or (candidates[0] if candidates else None)
    return Path(found).resolve().parent if found else None


def system_program(name: str) -> Path | None:
    """A program of a system package, on PATH or where Debian puts daemons (/usr/sbin, off a
    plain user's PATH), or None."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None)
    return Path(found) if found else None


@dataclass(frozen=True)
class Part:
    package: str  # the Debian/Ubuntu package
    what: str  # the part, as a person knows it
    needed_by: str
    present: Callable[[], bool]

    def missing_line(self) -> str:
        return (f"missing: {self.what}, needed by {self.needed_by}; install it as root with: "
                f"apt-get install {self.package}")


PARTS = {part.package: part for part in (
    Part("bubblewrap", "bubblewrap (bwrap)",
         "the OS sandbox for model-written code (code tasks) and tests/test_sandbox.py",
         lambda: shutil.which("bwrap") is not None),
    Part("chromium", "Chromium (chromium)",
         "the test that renders report.html in a browser (tests/test_report_browser.py)",
         lambda: shutil.which("chromium") is not None),
    Part("postgresql", "PostgreSQL's server (initdb, pg_ctl)",
         "the tests of workers sharing a database (tests/test_workers.py, tests/test_export.py)",
         lambda: postgres_bindir() is not None),
    Part("slurm-wlm", "SLURM (slurmctld, slurmd, sbatch)",
         "the test of workers as a SLURM job array (tests/test_slurm.py)",
         lambda: all(system_program(p) for p in ("slurmctld", "slurmd", "sbatch", "squeue"))),
    Part("munge", "MUNGE (munged), SLURM's authentication",
         "the test of workers as a SLURM job array (tests/test_slurm.py)",
         lambda: system_program("munged") is not None),
)}


def missing_reason(package: str) -> str | None:
    """The line saying that the part is missing, or None when it is here."""
    part = PARTS[package]
    return None if part.present() else part.missing_line()


def required(package: str) -> bool:
    """Whether a test needing the part must fail, not skip, where it is missing."""
    return os.environ.get(REQUIRE_ENV) == "1" or (
        package == "postgresql" and os.environ.get(REQUIRE_POSTGRES_ENV) == "1")


def set_up() -> None:
    """Install the missing parts where this process can (root, apt-get), quietly; say what is
    still missing, one line per part. Never fails: the venv is set up either way."""
    missing = [name for name in PARTS if missing_reason(name) is not None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                 "capture_output": True, "text": True, "check": False}
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", *missing]):
            done = subprocess.run(command, **quiet)
            if done.returncode != 0:
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
                print(f"setup: {' '.join(command)} failed: {' '.join(tail)}", file=sys.stderr)
                break
    for name in PARTS:
        reason = missing_reason(name)
        if reason is not None:
            print(reason, file=sys.stderr)  # the very line the tests that need it skip with


if __name__ == "__main__":
    set_up()
