"""What search.stop_early saved: per cell, the steps its trials trained (their rungs' decay
probes included) against the steps the same trials would train run to the end."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from lorasweep.analysis.optima import cell_order
from lorasweep.records import TrialRecord
from lorasweep.space import Cell

ENDED = ("complete", "diverged", "pruned")


@dataclass(frozen=True)
class StopCost:
    """One cell's trials (or the study's, `cell` None): how many ended how, and their steps."""

    cell: Cell | None
    complete: int
    pruned: int
    diverged: int
    steps: int  # trained, probes included
    full_steps: int  # the same trials, each trained to the end without probes

    @property
    def share(self) -> float:
        return self.steps / self.full_steps if self.full_steps else 1.0


def stop_costs(records: list[TrialRecord]) -> list[StopCost]:
    """Each cell with a complete trial that was evaluated at rungs, then the study's total (none
    when no trial stopped early). A trial to the end trains as many steps as the cell's complete
    ones."""
    by_cell: dict[Cell, list[TrialRecord]] = defaultdict(list)
    for record in records:
        if record.status in ENDED and record.steps is not None:
            by_cell[record.cell].append(record)
    costs = []
    for cell in sorted(by_cell, key=cell_order):
        ended = by_cell[cell]
        length = max((r.steps or 0 for r in ended if r.status == "complete"), default=0)
        if not length or not any(r.probe_steps for r in ended):
            continue
        counts = {status: sum(r.status == status for r in ended) for status in ENDED}
        costs.append(StopCost(cell=cell, complete=counts["complete"], pruned=counts["pruned"],
                              diverged=counts["diverged"],
                              steps=sum((r.steps or 0) + (r.probe_steps or 0) for r in ended),
                              full_steps=length * len(ended)))
    if not any(c.pruned for c in costs):  # a grid that records rungs and stops nothing
        return []
    return [*costs, StopCost(cell=None, **{name: sum(getattr(c, name) for c in costs)
                                           for name in ("complete", "pruned", "diverged",
                                                        "steps", "full_steps")})]
