"""search.stop_early's decisions: at each rung, which LRs of a cell go on and which stop.

Every trial of a cell pauses at each rung (train.py) with an evaluation after a decay probe.
Once every trial of the cell still going (each LR, each seed) has been evaluated at a rung, the
cell's rung curve is the mean over seeds of that evaluation at each LR, as the optimum's curve
is (analysis/optima.py: a seed that diverged scores worst; one that failed is left out); its
best LR b keeps going together with a window of grid LRs around it, and every other LR stops
there (status pruned). The window reaches one grid step above b and `drift` x log10(steps /
rung step) decades below it (at least one grid step): a rung is a shorter run, and the optimum
of a longer run sits at a lower LR (the short-horizon bias), the further the longer the run
still has to go. The default drift is set from benchmarks/search_cost.py's replay on real
curves, where a rung's best sat up to that far above the end's.

Why not Optuna's pruners: SuccessiveHalving, Hyperband and the median pruner decide for one
trial as it reports, against whatever other trials reported so far, so the decision depends on
the order in which workers ran trials; they know nothing of a cell's LR axis (the best's grid
neighbours), and they compare the metric mid-run, which under a decaying schedule ranks high
LRs too low. Here a decision waits for the whole cell at the rung and is a pure function of the
recorded evaluations, so a resumed run, several workers and the replay decide alike.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from lorasweep.config import StopEarly
from lorasweep.space import Cell, TrialSpec, grid_step

# Statuses after which a trial records no more rung evaluations.
FINAL = ("complete", "diverged", "pruned", "failed")


@dataclass(frozen=True)
class Outcome:
    """What the store holds of one trial, as the planner reads it."""

    status: str
    metric: float | None = None
    rungs: tuple[dict, ...] = ()
    steps: int | None = None  # the steps it trained (read by the replay's cost, not decisions)

    def rung_score(self, rung: int, metric_name: str, maximize: bool) -> float | None:
        """The trial's score at rung `rung` (higher is better), -inf when it diverged before
        or in its probe; None when it has not reached it (or failed, or never had rungs)."""
        if len(self.rungs) > rung:
            value = self.rungs[rung].get(metric_name)
            if value is None or not math.isfinite(value):
                return -math.inf
            return value if maximize else -value
        return -math.inf if self.status == "diverged" else None


@dataclass
class Decisions:
    """For the trials paused at a rung: those that go on, and why the others stop."""

    go: set[str] = field(default_factory=set)
    stop: dict[str, str] = field(default_factory=dict)  # trial key -> the reason, one line


def decide(trials: list[TrialSpec], outcomes: Mapping[str, Outcome], rule: StopEarly,
           metric_name: str, maximize: bool) -> Decisions:
    """The decisions over every cell of `trials` (a study's planned trials)."""
    by_cell: dict[Cell, list[TrialSpec]] = defaultdict(list)
    for trial in trials:
        by_cell[trial.cell].append(trial)
    decisions = Decisions()
    for cell_trials in by_cell.values():
        _decide_cell(cell_trials, outcomes, rule, metric_name, maximize, decisions)
    for trial in trials:  # paused past the rule's last rung (its rungs were changed): go on
        outcome = outcomes.get(trial.key)
        if outcome is not None and outcome.status == "paused" \
                and len(outcome.rungs) > len(rule.rungs):
            decisions.go.add(trial.key)
    return decisions


def _decide_cell(trials: list[TrialSpec], outcomes: Mapping[str, Outcome], rule: StopEarly,
                 metric_name: str, maximize: bool, decisions: Decisions) -> None:
    """Decide the cell's rungs in order, each once every LR not stopped before it has reached
    it. Who takes part in a rung is read from what the trials did (an LR stopped at an earlier
    rung does not; one that went on does), so an LR added to the grid later (a transfer
    search's widening) joins without reopening what was decided."""
    lrs = sorted({t.lr for t in trials})
    by_lr: dict[float, list[TrialSpec]] = defaultdict(list)
    for trial in trials:
        by_lr[trial.lr].append(trial)
    stopped: set[str] = set()  # trial keys stopped here, at a rung before the one decided now
    lowest = len(lrs)  # the lowest LR (its index) that was the best at a rung decided so far
    for rung in range(len(rule.rungs)):
        scores: dict[float, float] = {}
        at_rung: list[TrialSpec] = []  # paused at this rung: they take its decision
        for lr in lrs:
            seed_scores = []
            for trial in by_lr[lr]:
                outcome = outcomes.get(trial.key)
                if outcome is None or trial.key in stopped or (
                        outcome.status == "pruned" and len(outcome.rungs) <= rung):
                    continue  # not started (a later widening), or stopped before this rung
                score = outcome.rung_score(rung, metric_name, maximize)
                if score is None and outcome.status not in FINAL:
                    return  # still on its way to this rung
                if score is not None:
                    seed_scores.append(score)
                if outcome.status == "paused" and len(outcome.rungs) == rung + 1:
                    at_rung.append(trial)
            if seed_scores:
                scores[lr] = sum(seed_scores) / len(seed_scores)
        if not scores:
            return
        best = max(scores, key=lambda lr: (scores[lr], -lr))  # ties: the lower LR
        index = lrs.index(best)
        # The horizon only pulls the optimum down (a longer run prefers a lower LR), so a best
        # above an earlier rung's best is noise: the window reaches below the lowest of them.
        lowest = min(lowest, index)
        below = window_below(rule, rung, grid_step(lrs))
        window = set(lrs[max(0, lowest - below):index + 2])
        step = _rung_step(by_lr, outcomes, rung)
        for trial in at_rung:
            if trial.lr in window:
                decisions.go.add(trial.key)
            else:
                decisions.stop[trial.key] = _reason(rung, step, trial.lr, scores, best,
                                                    metric_name, maximize)
                stopped.add(trial.key)
        if any(trial.key in decisions.go for trial in at_rung):
            return  # the next rung waits for them


def window_below(rule: StopEarly, rung: int, step: float | None) -> int:
    """Grid steps below a rung's best that go on: the drift over the training still to go."""
    if not step:
        return 1
    return max(1, round(rule.drift * math.log10(1 / rule.rungs[rung]) / step))


def _rung_step(by_lr: dict[float, list[TrialSpec]], outcomes: Mapping[str, Outcome],
               rung: int) -> int | None:
    """The step of a rung, as the trials that reached it recorded it."""
    for trials in by_lr.values():
        for trial in trials:
            outcome = outcomes.get(trial.key)
            if outcome is not None and len(outcome.rungs) > rung:
                return int(outcome.rungs[rung]["step"])
    return None


def _reason(rung: int, step: int | None, lr: float, scores: dict[float, float], best: float,
            metric_name: str, maximize: bool) -> str:
    """Why an LR stops, in the words trials.csv's reason column gives."""
    sign = 1 if maximize else -1

    def shown(score: float) -> str:
        return "diverged" if math.isinf(score) else f"{sign * score:.4g}"
    where = f"rung {rung + 1}" + (f" (step {step})" if step is not None else "")
    return (f"stopped at {where}: {metric_name} after the decay probe {shown(scores[lr])} at "
            f"lr {lr:.3g}, the cell's best {shown(scores[best])} at lr {best:.3g}; outside "
            "the LRs kept around the best")
