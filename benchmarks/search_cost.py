"""What the searches that spend less than the full grid spend, and how often they land on the full
grid's optimum: the transfer-first search (trials) and search.stop_early (training steps).

The search is *replayed* on studies whose full grid was run: the transfer-first plan
(lorasweep.study.plan, the same code `lorasweep run` uses with `search.strategy: transfer`) picks
its trials, and each trial's metric is looked up in the finished full grid instead of being
trained again (the numbers it would have got, as training is deterministic). For every cell, the
search's optimum (lr_star from the trials it ran) is compared with the full grid's: a hit when
they differ by at most one grid step.

Transfer, two kinds of studies:
- real: the shipped example studies (examples/*.yaml, results in examples/results/);
- synthetic: full grids scored by a known response with noise, at the scale the target is set
  for (8 ranks, 6 LRs per decade). The optimum moves with rank as muA says up to a per-family
  error in the exponent (uniform within +-0.15, about the measured -0.54 against muA's -0.5),
  full fine-tuning's optimum is LoRA's (constant lora_alpha) over a ratio drawn between 5 and 20;
  the metric falls quadratically in log-LR (0.5 per decade squared, twice as fast above the
  optimum), with Gaussian noise of the given sd, and diverges 0.8 decades above the optimum.

search.stop_early is replayed on full grids that recorded every trial at the rungs without
stopping any (examples/rungs/*.yaml, `stop_early.stop: false`; results in examples/results/):
each trial pauses at a rung with the evaluation it recorded there, and goes on or stops as the
plan decides, by the same code as `lorasweep run`. Its cost is the training steps the trials
take (a stopped one: up to its rung; the decay probes included) against the steps of the full
grid without rungs. Variants beside the default rule: the greedy rung (the mid-run metric before
the probe, no probe: what a generic pruner compares), fewer rungs, other windows, a coarser grid
(every other LR), and with the transfer search on a family of ranks.

Usage: python benchmarks/search_cost.py [--studies N] [--noise SD ...] [--skip-transfer]
                                        [--stop-early all|default|none]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorasweep.analysis.optima import find_optima
from lorasweep.analysis.transfer import grid_steps
from lorasweep.config import StopEarly, Study, load_study, validate_study
from lorasweep.records import TrialRecord
from lorasweep.space import expand_trials
from lorasweep.study.plan import recorded_outcomes, replay_search
from lorasweep.study.rungs import Outcome

ROOT = Path(__file__).resolve().parent.parent
REAL = [("lora_without_regret", "lora-without-regret"),
        ("learning_rate_matters", "learning-rate-matters")]


def _records(study: Study, outcomes: dict[str, Outcome]) -> list[TrialRecord]:
    return [TrialRecord(trial=t.grid_id, cell=t.cell.recorded, lr=t.lr, seed=t.seed,
                        status=outcomes[t.key].status, metric=outcomes[t.key].metric)
            for t in expand_trials(study) if t.key in outcomes]


def misses(study: Study, recorded: dict[str, Outcome], searched: dict[str, Outcome],
           maximize: bool) -> list[float]:
    """Per cell of the full grid: how many grid steps the search's lr_star lies from the full
    grid's (inf where the search found none)."""
    full_records = _records(study, recorded)
    steps = grid_steps(full_records)
    full = {o.cell: o for o in find_optima(full_records, maximize)}
    found = {o.cell: o for o in find_optima(_records(study, searched), maximize)}
    return [abs(math.log10(found[cell].lr_star / o.lr_star)) / steps[cell]
            if cell in found else math.inf for cell, o in full.items()]


def compare(study: Study, recorded: dict[str, Outcome], maximize: bool) -> dict:
    """Replay the transfer search on a full grid's outcomes; its cost and hits."""
    searched = replay_search(study, recorded, maximize)
    errors = misses(study, recorded, searched, maximize)
    return {"trials": len(searched), "grid": len(recorded), "cells": len(errors),
            "hits": sum(e <= 1 + 1e-9 for e in errors), "worst": max(errors)}


def real_study(name: str, folder: str) -> tuple[Study, dict[str, Outcome], bool]:
    study = load_study(ROOT / "examples" / f"{name}.yaml", ["search.strategy=transfer"])
    return study, recorded_outcomes(study, ROOT / "examples" / "results" / folder), True


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
            recorded[trial.key] = Outcome("diverged")
            continue
        drop = 0.5 * off ** 2 * (2 if off > 0 else 1)
        recorded[trial.key] = Outcome("complete", 0.5 - drop + rng.normal(0, noise))
    return study, recorded, True


# search.stop_early on real full grids: (study file under examples/rungs/, results folder).
RUNG_STUDIES = [("text_plays", "rungs-text-plays"), ("vision_ranks", "rungs-vision-ranks"),
                ("charlm_gsm8k", "rungs-charlm-gsm8k")]
RECORDED_RUNGS = [0.0625, 0.125, 0.25, 0.5]  # the rungs those grids recorded
DEFAULT_RULE = StopEarly()


@dataclass(frozen=True)
class Variant:
    """One way to spend less than the full recorded grid, replayed: a stop_early rule (None: a
    plain grid that stops nothing), whether it compares the mid-run metric before the probe (a
    greedy rung, with no probe to pay for), every n-th LR of the recorded grid, and whether the
    transfer search plans the trials."""

    name: str
    rule: StopEarly | None = DEFAULT_RULE
    greedy: bool = False
    every: int = 1
    transfer: bool = False


VARIANTS = [
    Variant("stop_early with its defaults"),
    Variant("greedy rung: the metric before the probe, no probe", greedy=True),
    Variant("no drift (the window one grid step each side)", StopEarly(drift=0)),
    Variant("drift 0.5", StopEarly(drift=0.5)),
    Variant("a fourth rung at 1/2", StopEarly(rungs=RECORDED_RUNGS)),
    Variant("rungs 1/16 and 1/4 only", StopEarly(rungs=[0.0625, 0.25])),
    Variant("rungs 1/8 and 1/4 only (no rung at 1/16)", StopEarly(rungs=[0.125, 0.25])),
    Variant("stop_early on every other LR", every=2),
    Variant("plain grid of every other LR", rule=None, every=2),
    Variant("plain grid of every fourth LR", rule=None, every=4),
    Variant("stop_early with search.strategy transfer", transfer=True),
    Variant("plain grid with search.strategy transfer", rule=None, transfer=True),
]


def as_variant(recorded: Outcome, variant: Variant, metric_name: str) -> Outcome:
    """A recorded trial as the variant would have seen it: its rungs (the variant's subset of
    the recorded ones), each scored by the probe or, greedy, by the metric before it."""
    if variant.rule is None:
        return Outcome(recorded.status, recorded.metric, (), recorded.steps)
    picked = [recorded.rungs[RECORDED_RUNGS.index(f)] for f in variant.rule.rungs
              if RECORDED_RUNGS.index(f) < len(recorded.rungs)]
    if variant.greedy:
        picked = [{**r, metric_name: r[f"raw_{metric_name}"], "probe_steps": 0} for r in picked]
    return Outcome(recorded.status, recorded.metric, tuple(picked), recorded.steps)


def stop_replay(name: str, folder: str, variant: Variant) -> dict:
    """Replay one variant on one recorded grid: the training steps it spends against the whole
    recorded grid's, and how far each cell's lr_star lies from the whole grid's, in steps of
    the whole grid."""
    path = ROOT / "examples" / "rungs" / f"{name}.yaml"
    results = ROOT / "examples" / "results" / folder
    whole = load_study(path)
    search = whole.search.model_copy(update={
        "stop_early": None if variant.rule is None else variant.rule.model_copy(
            update={"stop": True}),
        "strategy": "transfer" if variant.transfer else "grid",
        "lr": whole.search.lrs_for(whole.search.methods[0])[::variant.every]})
    study = whole.model_copy(update={"search": search})
    metric_name, maximize = study.task.objective, study.task.maximize
    reference = recorded_outcomes(whole, results)
    recorded = {key: as_variant(outcome, variant, metric_name) for key, outcome in
                recorded_outcomes(study, results).items()}
    searched = replay_search(study, recorded, maximize)
    steps = grid_steps(_records(whole, reference))
    full = {o.cell: o for o in find_optima(_records(whole, reference), maximize)}
    found = {o.cell: o for o in find_optima(_records(study, searched), maximize)}
    errors = [abs(math.log10(found[cell].lr_star / o.lr_star)) / steps[cell]
              if cell in found else math.inf for cell, o in full.items()]
    # what a miss costs: the whole grid's mean metric (over seeds) at the search's best LR
    # against at its own best LR, beside the seeds' spread at the whole grid's best
    curves = _mean_curves(_records(whole, reference))
    regret = [abs(curves[cell][found[cell].lr_best] - o.peak) if cell in found else math.inf
              for cell, o in full.items()]
    return {"lrs": len(search.lrs_for(search.methods[0])),
            "grid": sum(o.steps or 0 for o in reference.values()),
            "spent": sum(_spent(o) for o in searched.values()),
            "cells": len(errors), "hits": sum(e <= 1 + 1e-9 for e in errors),
            "worst": max(errors),
            "regret": max(regret), "spread": max(o.peak_std or 0 for o in full.values())}


def _mean_curves(records: list[TrialRecord]) -> dict:
    """Per cell: {lr: the mean over seeds of the validation metric} (complete trials)."""
    values: dict = {}
    for r in records:
        if r.status == "complete" and r.metric is not None:
            values.setdefault(r.cell, {}).setdefault(r.lr, []).append(r.metric)
    return {cell: {lr: sum(v) / len(v) for lr, v in by_lr.items()}
            for cell, by_lr in values.items()}


def _spent(outcome: Outcome) -> int:
    """The steps a replayed trial trained: to its end, to where it diverged, or to the rung
    where it stopped; and the decay probes of the rungs it reached."""
    probes = sum(int(r["probe_steps"]) for r in outcome.rungs)
    if outcome.status == "pruned":
        return int(outcome.rungs[-1]["step"]) + probes
    return (outcome.steps or 0) + probes


def print_stop_early(variants: list[Variant]) -> None:
    print("\n| variant | study | LRs per cell | cells | steps spent / whole grid | "
          "cells within 1 step | worst miss (steps) | worst regret (seed sd) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        for name, folder in RUNG_STUDIES:
            if not (ROOT / "examples" / "results" / folder / "rungs.csv").is_file():
                continue
            r = stop_replay(name, folder, variant)
            print(f"| {variant.name} | {folder} | {r['lrs']} | {r['cells']} | "
                  f"{r['spent']} / {r['grid']} ({r['spent'] / r['grid']:.0%}) | "
                  f"{r['hits']}/{r['cells']} ({r['hits'] / r['cells']:.0%}) | "
                  f"{r['worst']:.2f} | "
                  f"{r['regret']:.3f} ({r['spread']:.3f}) |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="synthetic studies per noise")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.005, 0.02])
    parser.add_argument("--skip-transfer", action="store_true",
                        help="only the search.stop_early replays")
    parser.add_argument("--stop-early", choices=["all", "default", "none"], default="all",
                        help="which search.stop_early variants to replay (default: all)")
    args = parser.parse_args(argv)
    if not args.skip_transfer:
        print_transfer(args.studies, args.noise)
    if args.stop_early != "none":
        print_stop_early(VARIANTS if args.stop_early == "all" else VARIANTS[:1])


def print_transfer(studies: int, noises: list[float]) -> None:
    print("| study | grid trials | search trials | fraction | cells within 1 step | "
          "worst (steps) |")
    print("|---|---|---|---|---|---|")

    def line(name: str, r: dict) -> None:
        print(f"| {name} | {r['grid']} | {r['trials']} | {r['trials'] / r['grid']:.0%} | "
              f"{r['hits']}/{r['cells']} ({r['hits'] / r['cells']:.0%}) | {r['worst']:.2f} |")

    for name, folder in REAL:
        line(f"{name} (real)", compare(*real_study(name, folder)))
    for noise in noises:
        rng = np.random.default_rng(0)
        total = {"trials": 0, "grid": 0, "cells": 0, "hits": 0, "worst": 0.0}
        for _ in range(studies):
            result = compare(*synthetic_study(rng, noise))
            for key in ("trials", "grid", "cells", "hits"):
                total[key] += result[key]
            total["worst"] = max(total["worst"], result["worst"])
        line(f"synthetic, noise sd {noise:g}, {studies} studies (summed)", total)


if __name__ == "__main__":
    main()
