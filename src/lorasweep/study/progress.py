"""How far a `lorasweep run` has got, for the person waiting on it.

On a terminal, tqdm draws one live line: trials done of the total, elapsed time and ETA, and the
group training now (method, rank, LRs) at its step. Where stderr is not a terminal (a log file, a
pipe, CI) a redrawn line would be a flood of carriage returns, so each finished group prints one
plain line instead: trials done of the total, the group, and the ETA. `TQDM_DISABLE=1` silences
both; the worker processes of `--workers N` run with it, since their parent shows the study's
progress.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm.auto import tqdm

from lorasweep.space import TrialSpec


def describe_group(trials: list[TrialSpec]) -> str:
    """'lora r=8 lr 0.001,0.003' / 'full seed 1 lr 0.0001': what a person needs to tell groups
    apart (a seed other than 0 is named)."""
    cell = trials[0].cell
    rank = f" r={cell.rank}" if cell.is_adapter else ""
    recipe = f" {cell.recipe}" if cell.recipe else ""
    seed = f" seed {trials[0].seed}" if trials[0].seed else ""
    lrs = ",".join(f"{t.lr:.2g}" for t in trials)
    return f"{cell.label}{rank}{recipe}{seed} lr {lrs}"


class RunProgress:
    """The progress of one process's trials: a live tqdm line on a terminal, else plain lines.

    `start(trials)` names the group about to train and returns the per-step hook that
    `train_group` calls; `finished(trials)` counts a group once it is recorded; `planned(n)` adds
    trials that a transfer search planned after the run began; `set_done` counts what others
    (the workers of --workers) finished. The ETA is the time per trial so far in this run times
    the trials left.
    """

    def __init__(self, label: str, total: int, done: int = 0, file: TextIO | None = None,
                 unit: str = "trial") -> None:
        self.file = file if file is not None else sys.stderr
        self.label, self.unit = label, unit
        self.total, self.done, self.first = total, done, done
        self.started = time.monotonic()
        self.quiet = _disabled_by_env()
        self.live = not self.quiet and self.file.isatty()
        self.group = ""
        # smoothing=0: the ETA uses the mean time per trial of this run (trials are alike), not
        # the last group's, which a fused or resumed group would skew.
        self.bar = tqdm(total=total, initial=done, desc=label, unit=unit, file=self.file,
                        disable=not self.live, smoothing=0, dynamic_ncols=True)

    def planned(self, count: int) -> None:
        """`count` more trials to train (a transfer search's next wave, dead runs requeued)."""
        if count:
            self.total += count
            self.bar.total = self.total
            self.bar.refresh()

    def start(self, trials: list[TrialSpec]) -> Callable[[int, int], None]:
        """Show the group about to train; the returned hook (`train_group`'s `progress`) shows
        its step."""
        self.group = describe_group(trials)
        if self.live:
            self.bar.set_postfix_str(self.group)

        def at_step(step: int, steps: int) -> None:
            if self.live:
                self.bar.set_postfix_str(f"{self.group} step {step}/{steps}")

        return at_step

    def finished(self, trials: list[TrialSpec]) -> None:
        """Count a recorded group; off a terminal, say so in one line."""
        if trials:
            self.set_done(self.done + len(trials), what=f" ({describe_group(trials)})")

    def set_done(self, done: int, total: int | None = None, what: str = "") -> None:
        """`done` of `total` trials are finished now (`what`: which, or who finished them)."""
        total = max(self.total if total is None else total, done)
        if (done, total) == (self.done, self.total):
            return
        self.done, self.total = done, total
        if self.live:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        elif not self.quiet:
            print(f"{self.label}: {done}/{total} {self.unit}s done{what}; "
                  f"elapsed {tqdm.format_interval(self.elapsed)}, ETA {self.eta()}",
                  file=self.file, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> str:
        """The time left as h:mm:ss or mm:ss; '?' before this run has finished a trial."""
        counted = self.done - self.first
        if counted <= 0:
            return "?"
        return tqdm.format_interval(self.elapsed / counted * (self.total - self.done))

    def close(self) -> None:
        self.bar.close()


def _disabled_by_env() -> bool:
    """TQDM_DISABLE as tqdm reads it: any value but the empty string turns progress off."""
    return bool(os.environ.get("TQDM_DISABLE"))
