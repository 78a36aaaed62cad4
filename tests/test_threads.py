"""The tests that compare numbers torch computes hold at any torch thread count.

Command (b) runs the suite in two processes with one torch thread each (`-n 2`, conftest.py);
`-n 0` runs it in one process with a thread per core. Rounding depends on the thread count (and
on the CPU): a test that compares two computations of the same thing to a tolerance that only
one thread count meets passes on one machine and fails on the next. The tests marked `numerics`
(pyproject.toml) are those that compare such numbers; this runs them again in one process with
the other count (two threads where the suite runs with one, one where it runs with more), so
command (b) checks both counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
EXPECT_ENV = "LORASWEEP_TEST_THREADS"  # the count the rerun asked for, checked inside it
TIMEOUT = 1200


def test_the_numerics_tests_pass_with_the_other_thread_count():
    import torch

    other = 2 if torch.get_num_threads() == 1 else 1
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST")}
    env.update({"OMP_NUM_THREADS": str(other), EXPECT_ENV: str(other), "HF_HUB_OFFLINE": "1"})
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-n", "0",
                           "-p", "no:cacheprovider", str(TESTS)], env=env, cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"with {other} torch threads:\n{done.stdout[-6000:]}"
    assert " passed" in done.stdout.splitlines()[-1]


@pytest.mark.numerics
def test_the_rerun_has_the_threads_it_asked_for():
    """Inside the rerun: torch uses the count asked for (elsewhere there is none to check)."""
    import torch

    asked = os.environ.get(EXPECT_ENV)
    assert asked is None or torch.get_num_threads() == int(asked)
