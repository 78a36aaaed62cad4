"""A study's analysis from its trial records, each part computed once and only when read.

The report's tables and figures, the answer (report, `run`, `status`) and the pairwise table all
read the same numbers from one StudyAnalysis, so two places never show two bootstraps of one
difference. `status` reads the optima, the peaks and every pair's difference (the answer's
rivals are read from them: about 2.5 s for 150 cells of three seeds on a busy 2-core machine),
and pays for no rank or recipe fit.
"""

from __future__ import annotations

from functools import cached_property

from lorasweep.analysis.compare import Difference, Peak, pairwise, tuned_peaks
from lorasweep.analysis.optima import Optimum, find_optima
from lorasweep.analysis.recipe import AxisFit, fit_recipe_axes
from lorasweep.analysis.scaling import RankFit, fit_rank_scaling
from lorasweep.analysis.stopping import StopCost, stop_costs
from lorasweep.analysis.transfer import CheckRow, check_rules, grid_steps
from lorasweep.records import TrialRecord


class StudyAnalysis:
    """What a study's trials say, ranked by its metric (`maximize`: higher is better)."""

    def __init__(self, records: list[TrialRecord], metric_name: str, maximize: bool) -> None:
        self.records = records
        self.metric_name = metric_name
        self.maximize = maximize

    @cached_property
    def optima(self) -> list[Optimum]:
        return find_optima(self.records, self.maximize)

    @cached_property
    def peaks(self) -> list[Peak]:
        """Each optimum's metric at its best grid LR, in the optima's order."""
        return tuned_peaks(self.records, self.optima)

    @cached_property
    def differences(self) -> list[Difference]:
        return pairwise(self.peaks)

    @property
    def seeded(self) -> bool:
        """Whether some peak has an interval over seeds."""
        return any(p.low is not None for p in self.peaks)

    @cached_property
    def rank_fits(self) -> list[RankFit]:
        return fit_rank_scaling(self.optima)

    @cached_property
    def transfer_checks(self) -> list[CheckRow]:
        return check_rules([(self.optima, grid_steps(self.records))])

    @cached_property
    def recipe_fits(self) -> list[AxisFit]:
        return fit_recipe_axes(self.records, self.maximize, optima=self.optima)

    @cached_property
    def stop_costs(self) -> list[StopCost]:
        """search.stop_early's savings per cell, then in all (none without it)."""
        return stop_costs(self.records)
