"""Hooks for the training libraries a study's trainer command runs (trainers/command.py reads
what they report). Imported by the user's script, never by lorasweep itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback as _HFCallback


class TrainerCallback(_HFCallback):
    """Report every evaluation of a Hugging Face `Trainer` (TRL's trainers included) to
    lorasweep as one JSON line: `{"step": N, "eval_loss": ..., "eval_accuracy": ...}`.

    Lines go to stdout (study file: `result: {stdout: true, key: eval_accuracy}`) or, with
    `path`, are appended to that file (`result: {file: PATH, key: ...}`). Every evaluation is
    one point of the trial's curve; the last is its result (or the best, `task.select: best`).
    Only the main process reports, so a multi-GPU run prints each evaluation once.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        line = json.dumps({"step": state.global_step, **numbers})
        if self.path is None:
            print(line, file=sys.stdout, flush=True)
        else:
            with open(self.path, "a") as handle:
                handle.write(line + "\n")
