"""How one worker trains (`WorkOptions`): shared by the worker loop (runner.py) and the
`--workers N` launcher (local_workers.py), which passes them on to each worker process, so
neither of those two modules needs the other's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasweep.study.defaults import DEFAULT_PATIENCE_SECONDS
from lorasweep.trainers.memory import GroupSizes


@dataclass(frozen=True)
class WorkOptions:
    """How one worker trains: its device, its group size (None: as many as fit the memory,
    or `memory_limit` bytes), its patience with the storage."""

    device: str = "cpu"
    max_group: int | None = 1
    patience: float = DEFAULT_PATIENCE_SECONDS
    memory_limit: int | None = None

    def group_sizes(self) -> GroupSizes:
        return GroupSizes(torch.device(self.device), self.max_group, self.memory_limit)
