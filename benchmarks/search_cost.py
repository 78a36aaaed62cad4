"""Trials a transfer-first search spends against the full grid, and how often it lands on the full
grid's optimum.

The search is *replayed* on studies whose full grid was run: the transfer-first plan
(lorasweep.study.plan, the same code `lorasweep run` uses with `search.strategy: transfer`) picks
its trials, and each trial's metric is looked up in the finished full grid instead of being
trained again (the numbers it would have got, as training is deterministic). For every cell, the
search's optimum (lr_star from the trials it ran) is compared with the full grid's: a hit when
they differ by at most one grid step.

Two kinds of studies:
- real: the shipped example studies (examples/*.yaml, results in examples/results/);
- synthetic: full grids scored by a known response with noise, at the scale the target is set
  for (8 ranks, 6 LRs per decade). The optimum moves with rank as muA says up to a per-family
  error in the exponent (uniform within +-0.15, about the measured -0.54 against muA's -0.5),
  full fine-tuning's optimum is LoRA's (constant lora_alpha) over a ratio drawn between 5 and 20;
  the metric falls quadratically in log-LR (0.5 per decade squared, twice as fast above the
  optimum), with Gaussian noise of the given sd, and diverges 0.8 decades above the optimum.

Usage: python benchmarks/search_cost.py [--studies N] [--noise SD ...]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from lorasweep.analysis.optima import find_optima
from lorasweep.analysis.transfer import grid_steps
from lorasweep.config import Study, load_study, validate_study
from lorasweep.records import TrialRecord, read_trials_csv
from lorasweep.space import TrialSpec, expand_trials
from lorasweep.study.plan import Outcome, replay_search

ROOT = Path(__file__).resolve().parent.parent
REAL = [("lora_without_regret", "lora-without-regret"),
        ("learning_rate_matters", "learning-rate-matters")]


def _match(trial: TrialSpec) -> tuple:
    return (trial.cell.recorded, trial.lr, trial.seed)


def _records(study: Study, outcomes: dict[str, Outcome]) -> list[TrialRecord]:
    return [TrialRecord(trial=t.grid_id, cell=t.cell.recorded, lr=t.lr, seed=t.seed,
                        status=outcomes[t.key][0], metric=outcomes[t.key][1])
            for t in expand_trials(study) if t.key in outcomes]


def compare(study: Study, recorded: dict[str, Outcome], maximize: bool) -> dict:
    """Replay the transfer search on a full grid's outcomes; its cost and hits."""
    searched = replay_search(study, recorded, maximize)
    full_records = _records(study, recorded)
    steps = grid_steps(full_records)
    full = {o.cell: o for o in find_optima(full_records, maximize)}
    found = {o.cell: o for o in find_optima(_records(study, searched), maximize)}
    errors = [abs(math.log10(found[cell].lr_star / o.lr_star)) / steps[cell]
              if cell in found else math.inf for cell, o in full.items()]
    return {"trials": len(searched), "grid": len(recorded), "cells": len(full),
            "hits": sum(e <= 1 + 1e-9 for e in errors), "worst": max(errors)}


def real_study(name: str, folder: str) -> tuple[Study, dict[str, Outcome], bool]:
    study = load_study(ROOT / "examples" / f"{name}.yaml", ["search.strategy=transfer"])
    by_match = {(r.cell, r.lr, r.seed): r
                for r in read_trials_csv(ROOT / "examples" / "results" / folder)}
    recorded = {t.key: (by_match[_match(t)].status, by_match[_match(t)].metric)
                for t in expand_trials(study)}
    return study, recorded, True


SYNTHETIC = {
    "name": "synthetic", "model": {"source": "tiny:bert"},
    "task": {"kind": "classification", "dataset": "unused"}, "train": {"steps": 1},
    "search": {"methods": [{"name": "lora", "lr": {"low": 1e-4, "high": 1e-1, "per_decade": 6}},
                           {"name": "full", "lr": {"low": 1e-6, "high": 1e-3, "per_decade": 6}}],
               "ranks": [1, 2, 4, 8, 16, 32, 64, 128], "lora_alpha": [16, "2r"],
               "strategy": "transfer", "seeds": [0]},
}


def synthetic_study(rng: np.random.Generator, noise: float) -> tuple[Study, dict, bool]:
    """A full grid scored by a known response (module docstring)."""
    study = validate_study(SYNTHETIC, "synthetic")
    base = {"16": 10 ** rng.uniform(-3, -2), "2r": 10 ** rng.uniform(-2.5, -1.5)}
    beta = {"16": 0.0 + rng.uniform(-0.15, 0.15), "2r": -0.5 + rng.uniform(-0.15, 0.15)}
    full_star = base["16"] / 10 ** rng.uniform(math.log10(5), math.log10(20))
    recorded = {}
    for trial in expand_trials(study):
        cell = trial.cell
        if cell.rank is None:
            star = full_star
        else:  # the optimum at rank 16 is `base`, moving as r^beta
            star = base[cell.lora_alpha] * (cell.rank / 16) ** beta[cell.lora_alpha]
        off = math.log10(trial.lr / star)
        if off > 0.8:
            recorded[trial.key] = ("diverged", None)
            continue
        drop = 0.5 * off ** 2 * (2 if off > 0 else 1)
        recorded[trial.key] = ("complete", 0.5 - drop + rng.normal(0, noise))
    return study, recorded, True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="synthetic studies per noise")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.005, 0.02])
    args = parser.parse_args(argv)
    print("| study | grid trials | search trials | fraction | cells within 1 step | "
          "worst (steps) |")
    print("|---|---|---|---|---|---|")

    def line(name: str, r: dict) -> None:
        print(f"| {name} | {r['grid']} | {r['trials']} | {r['trials'] / r['grid']:.0%} | "
              f"{r['hits']}/{r['cells']} ({r['hits'] / r['cells']:.0%}) | {r['worst']:.2f} |")

    for name, folder in REAL:
        line(f"{name} (real)", compare(*real_study(name, folder)))
    for noise in args.noise:
        rng = np.random.default_rng(0)
        total = {"trials": 0, "grid": 0, "cells": 0, "hits": 0, "worst": 0.0}
        for _ in range(args.studies):
            result = compare(*synthetic_study(rng, noise))
            for key in ("trials", "grid", "cells", "hits"):
                total[key] += result[key]
            total["worst"] = max(total["worst"], result["worst"])
        line(f"synthetic, noise sd {noise:g}, {args.studies} studies (summed)", total)


if __name__ == "__main__":
    main()
