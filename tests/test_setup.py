"""One path from a fresh machine: CI runs the README's own command, set-up says in one line what
it could not install, and a test whose system part is missing skips with that same line (or
fails with it where CI requires every part). The linter runs here, so that command checks it."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import system_parts
from .conftest import need_part

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
NOBODY = 65534


def readme_command(label: str) -> str:
    """The README's command `(label)`: the line after its `# (label) ...` comment."""
    lines = (REPO / "README.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"# ({label}) "))
    return lines[at + 1]


def test_ci_runs_the_readme_test_command():
    command = readme_command("b")
    assert command.startswith("bash scripts/setup.sh && ")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    # the shell's options, the checkout, CI's demand for every part, then the command, last (so
    # that its status is CI's: `set -e` does not stop at a failure inside an && list)
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."',
                  f"export {system_parts.REQUIRE_ENV}=1", command]


def test_the_quickstart_command_sets_up_the_venv_only(tmp_path: Path):
    """README (a) runs set-up with --venv-only, which skips the system parts and installs the
    runtime requirements only (any other argument is refused before anything is done)."""
    assert readme_command("a").startswith("bash scripts/setup.sh --venv-only && ")
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert "--venv-only) requirements=requirements.txt ;;" in script
    refused = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--bogus"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "usage: bash scripts/setup.sh [--venv-only]"


def test_lint_is_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "scripts",
                           "benchmarks", "examples"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_part_has_one_line_naming_it_what_needs_it_and_its_install():
    for name, part in system_parts.PARTS.items():
        line = part.missing_line()
        assert re.fullmatch(rf"missing: .+, needed by .+; install it as root with: "
                            rf"apt-get install {name}", line), line


@pytest.mark.parametrize("as_nobody", [False, True])
def test_setup_without_apt_or_root_says_what_is_missing(tmp_path: Path, as_nobody: bool):
    """Where set-up cannot install (no apt-get; not root), it prints the line of each missing
    part, installs nothing and goes on (exit 0). bwrap and chromium are kept off PATH, so that
    they are missing even where they are installed."""
    if SYSTEM_PYTHON is None:
        pytest.skip("no /usr/bin/python3 to run set-up's check with")
    path = tmp_path / "bin"
    path.mkdir()
    prefix: list[str] = []
    if as_nobody:
        if os.geteuid() != 0:
            pytest.skip("this process is not root: the case without apt-get covers it")
        apt = shutil.which("apt-get")
        if apt is not None:  # here, only being nobody keeps it from installing
            (path / "apt-get").symlink_to(apt)
        tmp_path.chmod(0o755)
        prefix = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}",
                  f"--regid={NOBODY}", "--clear-groups", "--"]
    done = subprocess.run([*prefix, SYSTEM_PYTHON, str(REPO / "tests" / "system_parts.py")],
                          env={"PATH": str(path)}, capture_output=True, text=True, timeout=120,
                          cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    # PostgreSQL, SLURM and MUNGE are found off PATH, where Debian puts them
    off_path = [system_parts.missing_reason(name) for name in system_parts.PARTS
                if name not in ("bubblewrap", "chromium")]
    expected = [system_parts.PARTS[name].missing_line() for name in ("bubblewrap", "chromium")]
    assert done.stderr.splitlines() == expected + [line for line in off_path if line]
    assert done.stdout == ""


@pytest.mark.parametrize(("package", "env", "fails"), [
    ("chromium", {}, False),
    ("chromium", {system_parts.REQUIRE_ENV: "1"}, True),  # as .ci/run sets it
    ("chromium", {system_parts.REQUIRE_POSTGRES_ENV: "1"}, False),
    ("postgresql", {system_parts.REQUIRE_POSTGRES_ENV: "1"}, True),
])
def test_a_missing_part_skips_with_the_setup_line_or_fails_where_required(monkeypatch, package,
                                                                          env, fails):
    gone = dataclasses.replace(system_parts.PARTS[package], present=lambda: False)
    monkeypatch.setitem(system_parts.PARTS, package, gone)
    for name in (system_parts.REQUIRE_ENV, system_parts.REQUIRE_POSTGRES_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    outcome = pytest.fail.Exception if fails else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        need_part(package)
    assert raised.value.msg == gone.missing_line()
