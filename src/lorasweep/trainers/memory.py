"""How many trials fit in one fused group, and what to do when a group does not fit after all.

The peak memory of a group grows about linearly in its size K: one base copy, plus per trial its
adapters, gradients, AdamW state and activations. One training step at K = 1 and at K = 2 gives
both terms; the group size is the largest K whose predicted peak fits the budget (`--memory-limit`,
else the device's free memory). A group that still runs out of memory (torch.OutOfMemoryError) is
split in halves and trained again from scratch: its trials are recorded, never failed for memory.
"""

from __future__ import annotations

import copy
import gc
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from lorasweep.errors import StudyError

if TYPE_CHECKING:
    from lorasweep.config import TrainSpec
    from lorasweep.tasks import Task

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(" + "|".join(UNITS) + r")?\s*$")
HEADROOM = 0.9  # of the device's free memory: the allocator fragments, other tensors come and go

T = TypeVar("T")
R = TypeVar("R")


def parse_memory(text: str) -> int:
    """Bytes in `40GiB`, `512MB` or a plain count of bytes; anything else is one line."""
    match = SIZE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise StudyError(f"--memory-limit {text!r}: not a size; give a positive number and a unit, "
                         f"e.g. 40GiB or 500MB (units: {', '.join(UNITS)})")
    return int(float(match.group(1)) * UNITS[match.group(2) or "B"])


def format_bytes(count: float) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if count >= UNITS[unit]:
            return f"{count / UNITS[unit]:.2f} {unit}"
    return f"{count:.0f} B"


def free_memory(device: torch.device) -> int:
    """What this process may still use on the device: on a GPU the free memory plus what its
    allocator holds cached; on the CPU the memory available without swapping (free pages and
    the page cache the kernel can reclaim, as psutil, a dependency of accelerate, reads it)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    import psutil

    return int(psutil.virtual_memory().available)


def how_measured(device: torch.device) -> str:
    reading = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
               else "tensor storage alive at the peak, counted operator by operator; the "
               "allocator's own overhead is not counted")
    return f"measured on {device} with one training step at K=1 and K=2 ({reading})"


def measure_peak(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on the device while `run` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    tracker = LiveTensorBytes(device)
    with tracker:
        run()
    return tracker.peak


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage on `device` alive at once, among tensors made inside.

    Hand-written because the CPU allocator keeps no peak, and torch's MemTracker (private API)
    hooks the gradient of every parameter and fails on a frozen base. Every tensor an operator
    returns passes here (backward included); a storage counts from its first appearance until
    Python frees it.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live = self.peak = 0
        self.known: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device == self.device:
                storage = tensor.untyped_storage()
                if storage not in self.known:
                    self.known[storage] = True
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class PeakModel:
    """Peak memory of a group of K trials, from one step at K = 1 and K = 2."""

    one: int
    two: int | None  # None: the cell never fuses (full fine-tuning, peft), or two did not fit

    def at(self, k: int) -> int:
        per_trial = 0 if self.two is None else max(self.two - self.one, 0)
        return self.one + (k - 1) * per_trial

    def largest_fitting(self, budget: int, ceiling: int) -> int:
        """The largest K up to `ceiling` whose predicted peak fits; at least 1."""
        if self.two is None:
            return 1
        fitting = [k for k in range(1, ceiling + 1) if self.at(k) <= budget]
        return max(fitting, default=1)


def probe_peaks(train: Callable[[list[T]], object], trial: T, fusable: bool,
                device: torch.device) -> PeakModel:
    """Measure one step of `train` (a one-step, no-evaluation trainer) at K = 1 and K = 2.

    Two copies of the same trial stand for two trials of its group: memory does not depend on
    which LRs they have. Two that do not fit leave the cell at one trial per group."""
    one = measure_peak(lambda: train([trial]), device)
    if not fusable:
        return PeakModel(one, None)
    try:
        return PeakModel(one, measure_peak(lambda: train([trial, trial]), device))
    except torch.OutOfMemoryError:
        pass
    release_memory()  # outside the handler, so the failed step's tensors can be freed
    return PeakModel(one, None)


def one_step(train: TrainSpec) -> TrainSpec:
    """The recipe cut to one step, for probing."""
    return train.model_copy(update={"steps": 1, "epochs": None, "eval_every": 0})


def without_evaluation(task: Task) -> Task:
    """The task with evaluation skipped, so a probe measures the training step alone."""
    probe = copy.copy(task)
    probe.evaluate = lambda model, split, k, *args: [{"eval_loss": 0.0} for _ in range(k)]
    return probe


def train_fitting(train: Callable[[list[T]], list[R]], trials: list[T], k: int,
                  on_split: Callable[[int], None] | None = None
                  ) -> Iterator[tuple[list[T], list[R]]]:
    """Train `trials` K at a time; yields each group and its results as it finishes.

    A group that runs out of memory is trained again as its first half (then the rest at that
    size), down to single trials; a single trial out of memory raises. `on_split(k)` hears of
    each smaller size, so later groups of the cell start there.
    """
    position = 0
    while position < len(trials):
        group = trials[position:position + k]
        try:
            results = train(group)
        except torch.OutOfMemoryError:
            if len(group) == 1:
                raise
            results = None
        if results is None:  # outside the handler, so the failed group's tensors can be freed
            release_memory()
            k = (len(group) + 1) // 2
            tqdm.write(f"out of memory with {len(group)} trials fused; retrying {k} at a time")
            if on_split is not None:
                on_split(k)
            continue
        yield group, results
        position += len(group)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


AUTO_CEILING = 64  # most trials one automatically sized group may hold


@dataclass
class GroupSizes:
    """Each cell's group size in one worker: `max_group` as given, or the largest measured to
    fit (when `max_group` is None, or a `memory_limit` is given: then `max_group` caps it), and
    smaller after an out-of-memory split."""

    device: torch.device
    max_group: int | None
    memory_limit: int | None
    sizes: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, PeakModel] = field(default_factory=dict)

    @property
    def automatic(self) -> bool:
        return self.max_group is None or self.memory_limit is not None

    @property
    def claim(self) -> int:
        """How many trials of one group to claim at once."""
        return self.max_group or AUTO_CEILING

    def budget(self) -> int:
        return self.memory_limit or int(HEADROOM * free_memory(self.device))

    def size(self, key: str, fusable: bool, probe: Callable[[], PeakModel]) -> int:
        """The group size of cell `key`; `probe` measures its peaks (once per cell)."""
        if not fusable:
            return 1
        if key not in self.sizes:
            if self.automatic:
                self.peaks[key] = probe()
                self.sizes[key] = self.peaks[key].largest_fitting(self.budget(), self.claim)
            else:
                self.sizes[key] = self.claim
        return self.sizes[key]

    def shrink(self, key: str, k: int) -> None:
        self.sizes[key] = min(self.sizes.get(key, k), k)
