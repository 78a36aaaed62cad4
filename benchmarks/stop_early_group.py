"""A fused group's step time before and after search.stop_early stops most of its LRs.

K trials of one cell train fused over one base copy (train.train_group); at a rung the group
pauses, the plan stops all but K' of them, and the K' go on together from their checkpoints.
The script times the training steps of the group of K before the rung and of the K' after it
(each step's time is the gap between two calls of train_group's progress hook, so evaluation
and the decay probe are left out), and, for reference, a fresh group of K' from the start:
after a prune the survivors should train at the cost of K', not K.

Usage: python benchmarks/stop_early_group.py [--k 8] [--kept 3] [--steps 24] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import pairwise

import torch

from lorasweep.config import validate_study
from lorasweep.space import expand_trials
from lorasweep.train import Rungs, train_group
from lorasweep.workbench import load_workbench

# The quickstart's model, task and batch (MiniLM, 16 passages of 48 tokens, LoRA rank 8).
STUDY = {
    "name": "stop-early-group", "model": {"source": "minilm"},
    "task": {"kind": "classification", "dataset": "builtin:shakespeare-plays",
             "validation_size": 64, "max_eval_examples": 64, "test_split": None},
    "train": {"steps": 24, "batch_size": 16, "seq_len": 48, "warmup_ratio": 0.0},
    "search": {"methods": ["lora"], "ranks": [8], "lora_alpha": ["2r"],
               "lr": {"low": 1e-4, "high": 1e-2, "per_decade": 3.5}},
}


def step_times(run) -> list[float]:
    """The seconds between consecutive training steps of `run(progress)`."""
    stamps: list[float] = []
    run(lambda step, steps: stamps.append(time.perf_counter()))
    return [b - a for a, b in pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--kept", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    study = validate_study({**STUDY, "train": {**STUDY["train"], "steps": args.steps}}, "s")
    bench = load_workbench(study, args.device)
    device = torch.device(args.device)
    trials = expand_trials(study)[:args.k]
    rung = args.steps // 2
    rungs = Rungs(steps=(rung,), probes=(max(1, rung // 4),), pause=True)

    def group(specs, resume=None):
        return lambda progress: results.extend(train_group(
            bench.base, bench.task, study.train, specs, device, progress=progress,
            rungs=rungs, resume=resume))

    results: list = []
    before = step_times(group(trials))
    paused = results[:]
    kept = trials[:args.kept]
    results.clear()
    after = step_times(group(kept, [r.checkpoint for r in paused[:args.kept]]))
    results.clear()
    fresh = step_times(group(kept))
    medians = {name: statistics.median(times) for name, times in
               (("before", before), ("after", after), ("fresh", fresh))}
    print(f"| group | trials | median step | per trial |\n|---|---|---|---|\n"
          f"| before the prune | {args.k} | {medians['before'] * 1000:.0f} ms | "
          f"{medians['before'] / args.k * 1000:.0f} ms |\n"
          f"| after the prune (resumed) | {args.kept} | {medians['after'] * 1000:.0f} ms | "
          f"{medians['after'] / args.kept * 1000:.0f} ms |\n"
          f"| fresh group of {args.kept} | {args.kept} | {medians['fresh'] * 1000:.0f} ms | "
          f"{medians['fresh'] / args.kept * 1000:.0f} ms |")
    print(f"\nstep time after / before: {medians['after'] / medians['before']:.2f} "
          f"(K'/K = {args.kept / args.k:.2f}); resumed / fresh group of {args.kept}: "
          f"{medians['after'] / medians['fresh']:.2f}")


if __name__ == "__main__":
    main()
