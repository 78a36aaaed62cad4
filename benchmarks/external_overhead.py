"""lorasweep's own cost per trial of a study over an external command (launching it through the
parent-death guard, writing its folder, leases, recording, reading its metric, trials.csv),
against the command's own run time.

The command sleeps `--sleep` seconds and writes results.json (a shell, so the command itself
costs little beyond its sleep). Its own time is measured by running it directly; lorasweep's
per-trial time is the difference between a study of `--trials` trials and a study of 2, divided
by the difference in trials, so the once-per-run costs (creating the store, the report) drop out
and are printed apart. Both studies run in this process, its imports done.

Usage: python benchmarks/external_overhead.py [--trials 12] [--sleep 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from lorasweep.config import validate_study
from lorasweep.study.runner import run_study

SCRIPT = "sleep {sleep} && printf '{{\"score\": %s}}' {lr} > results.json"


def study(trials: int, sleep: float, name: str):
    lrs = [round(1e-4 * 1.5 ** i, 8) for i in range(trials)]
    return validate_study({
        "name": name, "task": {"kind": "external", "metric": "score", "goal": "maximize"},
        "search": {"methods": ["lora"], "ranks": [4], "lr": lrs},
        "trainer": {"command": [SCRIPT.replace("{sleep}", str(sleep))], "shell": True,
                    "result": {"file": "results.json", "key": "score"}}}, "benchmark")


def timed_run(trials: int, sleep: float, root: Path) -> float:
    start = time.perf_counter()
    summary = run_study(study(trials, sleep, f"overhead-{trials}"), root / str(trials))
    assert summary.trained == trials and summary.failed == 0
    return time.perf_counter() - start


def command_alone(sleep: float, root: Path, repeats: int) -> float:
    line = SCRIPT.replace("{sleep}", str(sleep)).replace("{lr}", "0.001").replace("{{", "{")
    line = line.replace("}}", "}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", line], cwd=root, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--sleep", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        own = command_alone(args.sleep, root, repeats=5)
        small, large = timed_run(2, args.sleep, root), timed_run(args.trials, args.sleep, root)
    per_trial = (large - small) / (args.trials - 2)
    overhead = per_trial - own
    print(f"command alone: {own * 1000:.0f} ms (median of 5)")
    print(f"through lorasweep: {per_trial * 1000:.0f} ms per trial "
          f"({args.trials} trials in {large:.1f} s, 2 in {small:.1f} s)")
    print(f"lorasweep's own cost: {overhead * 1000:.0f} ms per trial "
          f"({per_trial / own:.2f}x the command's time); once per run: "
          f"{(small - 2 * per_trial) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
