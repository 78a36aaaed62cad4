"""search.stop_early run for real beside the full grid it saves, back to back on one machine.

One of the recorded grids of examples/rungs/ is run twice with `lorasweep run`, each in a fresh
folder and its own process: as the plain full grid (search.stop_early removed: no rungs, no
probes, every trial to the end) and with stopping on (the study's rungs and the stop_early
defaults). The script prints both wall times and their ratio, the training steps each spent,
and checks the real run against the replay (benchmarks/search_cost.py) of the same rule on the
recorded grid: the same trials stopped, the same optima.

Usage: python benchmarks/stop_early_wall.py [--study vision_ranks] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from search_cost import ROOT, RUNG_STUDIES, Variant, as_variant

from lorasweep.config import load_study
from lorasweep.records import read_optima_csv, read_trials_csv
from lorasweep.study.plan import recorded_outcomes, replay_search

STOPPING = "search.stop_early={}"  # the defaults, in place of the grid's record-only rungs


def run(study: Path, out: Path, threads: int, overrides: list[str]) -> float:
    """Seconds `lorasweep run` takes, set-up (imports, model load) included."""
    command = [sys.executable, "-m", "lorasweep.cli", "run", str(study), "--out", str(out),
               "--threads", str(threads)]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def spent(folder: Path) -> int:
    return sum((r.steps or 0) + (r.probe_steps or 0) for r in read_trials_csv(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="vision_ranks", choices=[n for n, _ in RUNG_STUDIES])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = ROOT / "examples" / "rungs" / f"{args.study}.yaml"
    out = args.out or Path(tempfile.mkdtemp(prefix="stop-early-wall-"))
    grid_seconds = run(path, out / "grid", args.threads, ["search.stop_early=null"])
    stop_seconds = run(path, out / "stop", args.threads, [STOPPING])
    print(f"| run | wall time | training steps |\n|---|---|---|\n"
          f"| full grid | {grid_seconds:.0f} s | {spent(out / 'grid')} |\n"
          f"| stop_early | {stop_seconds:.0f} s | {spent(out / 'stop')} |")
    print(f"\nwall time stop_early / full grid: {stop_seconds / grid_seconds:.2f}")
    # the real run against the replay of the same rule on the recorded grid
    study = load_study(path, [STOPPING])
    folder = dict(RUNG_STUDIES)[args.study]
    variant = Variant("defaults", study.search.stop_early)
    recorded = {key: as_variant(outcome, variant, study.task.objective) for key, outcome in
                recorded_outcomes(study, ROOT / "examples" / "results" / folder).items()}
    replayed = replay_search(study, recorded, study.task.maximize)
    real = recorded_outcomes(study, out / "stop")
    same = sum(replayed[key].status == real[key].status for key in real)
    print(f"statuses the same as the replay's: {same} of {len(real)}")
    optima = {o.cell: o.lr_star for o in read_optima_csv(out / "stop" / "optima.csv")}
    recorded_optima = {o.cell: o.lr_star for o in read_optima_csv(
        ROOT / "examples" / "results" / folder / "optima.csv")}
    for cell, lr_star in optima.items():
        print(f"  {cell.label} r={cell.rank}: lr_star {lr_star:.3g} "
              f"(full grid {recorded_optima.get(cell, float('nan')):.3g})")


if __name__ == "__main__":
    main()
