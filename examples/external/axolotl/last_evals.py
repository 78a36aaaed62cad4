"""Print the evaluations a Hugging Face Trainer recorded (log_history in the newest
trainer_state.json under a folder) as JSON lines, for lorasweep to read from stdout.

For trainers built on transformers' Trainer that write checkpoints but take no callback from
the command line (axolotl, LLaMA-Factory). A recipe: not run in lorasweep's tests.
Usage: python last_evals.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    states = sorted(Path(sys.argv[1]).rglob("trainer_state.json"),
                    key=lambda p: p.stat().st_mtime)
    if not states:
        sys.exit(f"{sys.argv[1]}: no trainer_state.json (does the config save checkpoints?)")
    for entry in json.loads(states[-1].read_text())["log_history"]:
        if "eval_loss" in entry:
            print(json.dumps(entry))


if __name__ == "__main__":
    main()
