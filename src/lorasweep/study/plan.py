"""Which trials a study runs, given the ones that finished: the whole grid, or a transfer-first
search that spends a fraction of it.

Transfer-first (`search.strategy: transfer`): every cell at the reference rank, and every cell no
transfer rule covers (PiSSA, DoRA, peft, ...), runs its whole LR grid. Once a reference cell's
trials have all finished, each other rank of its family gets `search.bracket` consecutive grid
LRs around the LR the first applicable rule of analysis.transfer predicts from the reference
optimum (muA's rank exponent); full fine-tuning gets its bracket once every reference cell has
finished, around the geometric mean of what they predict for it (the 10x LoRA / full ratio,
muA Init[B]). When a cell's bracket has finished and its best LR is the lowest or highest
it ran, the next grid LR beyond that edge is added, one at a time, until the best is inside (or
the grid ends, as the full grid would have). Every decision is a pure function of the study and
the finished trials, so resuming, or several workers, reach the same plan.

With search.stop_early (either strategy) the plan also says which trials paused at a rung go on
and which stop there (study/rungs.py); for the transfer search a stopped trial is finished.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lorasweep.analysis.optima import Optimum, find_optima
from lorasweep.analysis.transfer import Family, Target, predict
from lorasweep.config import Study
from lorasweep.records import TrialRecord, read_rungs_csv, read_trials_csv
from lorasweep.space import Cell, TrialSpec, expand_trials
from lorasweep.study.rungs import Decisions, Outcome, decide

if TYPE_CHECKING:
    from lorasweep.study.store import Store

DONE = ("complete", "diverged", "failed", "pruned")


@dataclass
class Plan:
    """What the study should hold now: its trials, and the decisions on those paused at a rung."""

    trials: list[TrialSpec]
    decisions: Decisions = field(default_factory=Decisions)


def reference_rank(ranks: list[int], chosen: int | None) -> int:
    """The rank tuned over the whole grid: the one chosen, else the middle one (the shortest
    extrapolation in log rank to the others)."""
    return chosen if chosen is not None else sorted(ranks)[(len(ranks) - 1) // 2]


def bracket(lrs: list[float], center: float, size: int) -> list[float]:
    """`size` consecutive grid LRs around the one nearest `center` (in log), shifted to stay
    inside the grid."""
    nearest = int(np.argmin(np.abs(np.log10(lrs) - math.log10(center))))
    start = min(max(nearest - (size - 1) // 2, 0), max(len(lrs) - size, 0))
    return lrs[start:start + size]


def widened(lrs: list[float], ran: list[float], edge: str) -> list[float]:
    """`ran` and the next grid LR beyond the edge where its best sits ("low"/"high"), if any."""
    low, high = lrs.index(min(ran)), lrs.index(max(ran))
    if edge == "low" and low > 0:
        return [lrs[low - 1], *ran]
    if edge == "high" and high < len(lrs) - 1:
        return [*ran, lrs[high + 1]]
    return ran


def _records(trials: list[TrialSpec], outcomes: dict[str, Outcome]) -> list[TrialRecord]:
    """The trials that have an outcome, as the analysis reads them."""
    return [TrialRecord(trial=t.grid_id, cell=t.cell.recorded, lr=t.lr, seed=t.seed,
                        status=outcomes[t.key].status, metric=outcomes[t.key].metric)
            for t in trials if t.key in outcomes]


def _optimum(trials: list[TrialSpec], outcomes: dict[str, Outcome],
             maximize: bool) -> Optimum | None:
    found = find_optima(_records(trials, outcomes), maximize)
    return found[0] if found else None


def _finished(trials: list[TrialSpec], outcomes: dict[str, Outcome]) -> bool:
    return all(t.key in outcomes and outcomes[t.key].status in DONE for t in trials)


def plan_trials(study: Study, outcomes: dict[str, Outcome], maximize: bool,
                widths: dict[str, int] | None = None) -> list[TrialSpec]:
    """The trials the study should have now (a subset of its grid, growing as trials finish)."""
    grid = expand_trials(study, widths)
    search = study.search
    if search.strategy == "grid":
        return grid
    by_cell: dict[Cell, list[TrialSpec]] = defaultdict(list)
    for trial in grid:
        by_cell[trial.cell].append(trial)
    reference = reference_rank(search.ranks, search.reference_rank)
    chosen: list[TrialSpec] = []
    for cell, trials in by_cell.items():
        if cell.rank is None:  # full fine-tuning: predicted from every reference cell
            sources = [t for c, t in by_cell.items() if c.rank == reference]
            target = Target(full=True)
        else:
            sources = [by_cell.get(replace(cell, rank=reference), [])]
            target = Target(rank=cell.rank)
        if cell.rank == reference or not any(sources):
            chosen += trials
            continue
        if not all(_finished(source, outcomes) for source in sources):
            continue  # the reference optima are not known yet
        lrs = sorted({t.lr for t in trials})
        ran = _lrs_for(trials, sources, target, outcomes, lrs, maximize, search.bracket)
        if ran is None:  # no rule or no reference optimum: the cell runs its whole grid
            chosen += trials
            continue
        picked = [t for t in trials if t.lr in ran]
        if _finished(picked, outcomes):
            found = _optimum(picked, outcomes, maximize)
            if found is not None and found.edge in ("low", "high"):
                ran = widened(lrs, ran, found.edge)
                picked = [t for t in trials if t.lr in ran]
        chosen += picked
    return chosen


def _lrs_for(trials: list[TrialSpec], sources: list[list[TrialSpec]], target: Target,
             outcomes: dict[str, Outcome], lrs: list[float], maximize: bool,
             size: int) -> list[float] | None:
    """The grid LRs a predicted cell runs: its bracket around the LR the rules predict from the
    reference optima (the geometric mean where several predict it), and every LR it has already
    run (earlier widenings); None when nothing predicts it."""
    predicted = []
    for source in sources:
        optimum = _optimum(source, outcomes, maximize)
        if optimum is not None and optimum.edge != "flat":
            family = Family(optimum.cell.family, [optimum], [math.nan])
            predicted += [p.lr for p in predict(family, target, {})[:1]]
    if not predicted:
        return None
    center = 10 ** float(np.mean(np.log10(predicted)))
    ran = {t.lr for t in trials if t.key in outcomes}
    return sorted(set(bracket(lrs, center, size)) | ran)


def plan_study(study: Study, outcomes: dict[str, Outcome], maximize: bool,
               widths: dict[str, int] | None = None) -> Plan:
    """The trials the study should have now, with the rung decisions of search.stop_early."""
    trials = plan_trials(study, outcomes, maximize, widths)
    rule = study.search.stop_early
    if rule is None or not rule.stop:  # trials paused before stopping was turned off go on
        paused = {t.key for t in trials if t.key in outcomes
                  and outcomes[t.key].status == "paused"}
        return Plan(trials, Decisions(go=paused))
    return Plan(trials, decide(trials, outcomes, rule, study.task.objective, maximize))


def planner(study: Study, store: Store, maximize: bool,
            widths: dict[str, int] | None = None) -> Callable[[], Plan]:
    """The plan as the runner asks for it: read every trial's outcome from the store, decide."""
    metric_name = study.task.objective

    def plan() -> Plan:
        if study.search.strategy == "grid" and study.search.stop_early is None:
            return Plan(expand_trials(study, widths))
        outcomes = {key: Outcome(status, trial.user_attrs.get(f"val_{metric_name}"),
                                 tuple(trial.user_attrs.get("rungs") or ()))
                    for key, (status, trial, _) in store.latest_by_key().items()}
        return plan_study(study, outcomes, maximize, widths)

    return plan


def replay_search(study: Study, recorded: dict[str, Outcome], maximize: bool) -> dict[str, Outcome]:
    """The trials a single worker's search would run, their outcomes looked up in `recorded`
    (a finished full grid, its trials evaluated at the rungs): plan, run everything planned,
    plan again, until the plan stops growing. This is how `lorasweep run` proceeds (it replans
    when nothing is waiting). With search.stop_early a trial pauses at each rung, and goes on
    or stops as the plan decides; a stopped trial keeps the rungs it reached, as a real run's
    pruned trial does."""
    rule = study.search.stop_early
    stopping = rule is not None and rule.stop
    seen: dict[str, Outcome] = {}
    while True:
        plan = plan_study(study, seen, maximize)
        new = [t for t in plan.trials if t.key not in seen]
        moved = plan.decisions.go | set(plan.decisions.stop)
        if not new and not moved:
            return seen
        for trial in new:
            full = recorded.get(trial.key, Outcome("failed"))
            seen[trial.key] = _paused_at(full, 0) if stopping else full
        for key in plan.decisions.go:
            seen[key] = _paused_at(recorded[key], len(seen[key].rungs))
        for key in plan.decisions.stop:
            seen[key] = Outcome("pruned", None, seen[key].rungs, seen[key].steps)


def _paused_at(full: Outcome, rung: int) -> Outcome:
    """A recorded trial as a real run sees it at its `rung`-th rung: paused there with the
    rungs so far, or its outcome (complete, or diverged) once it has no rung left to reach."""
    if rung >= len(full.rungs):
        return full
    return Outcome("paused", None, full.rungs[:rung + 1], int(full.rungs[rung]["step"]))


def recorded_outcomes(study: Study, folder: Path) -> dict[str, Outcome]:
    """A finished study folder's trials as `replay_search` looks them up: each of `study`'s grid
    trials (matched by cell, LR and seed, so the study may differ from the folder's in its
    search strategy) with its status, metric and rung evaluations (trials.csv, rungs.csv)."""
    rungs = read_rungs_csv(folder)
    by_match = {(r.cell, f"{r.lr:.6g}", r.seed): r for r in read_trials_csv(folder)}
    recorded = {}
    for trial in expand_trials(study):  # an LR as the trial keys write it (6 digits)
        record = by_match.get((trial.cell.recorded, f"{trial.lr:.6g}", trial.seed))
        if record is not None:
            recorded[trial.key] = Outcome(record.status, record.metric,
                                          tuple(rungs.get(record.trial, ())), record.steps)
    return recorded
