"""Fused K-trial LR sweep against the same trials run one by one with stock PEFT.

The baseline is what a user would otherwise write: for each LR, wrap a copy of the loaded base in
`peft.get_peft_model`, train it with a plain PyTorch loop (AdamW, warmup + cosine) on the same
batches, evaluate it. lorasweep trains the same K trials as one fused group. Each mode runs in its
own process so its peak memory (max RSS on the CPU, the allocator's peak on a GPU) is its own;
the ratios printed come from one run. `--groups` times the K trials fused in groups of each size
(1 is lorasweep one by one), to find the group size that pays on a device.

    .venv/bin/python benchmarks/fused_sweep.py                 # MiniLM and the tiny LM, K = 8
    .venv/bin/python benchmarks/fused_sweep.py --model tiny-lm --steps 10 --groups 1 2 4 8
    python benchmarks/fused_sweep.py --model smollm2 --device cuda --precision bf16  # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the script imports lorasweep and torch inside each measured process
    import torch
    from torch import nn

    from lorasweep.config import TrainSpec
    from lorasweep.space import TrialSpec
    from lorasweep.tasks import Task

MODELS = {
    # name: (study overrides, task kind)
    "minilm": ["model.source=minilm", "task.kind=classification"],
    "tiny-lm": ["model.source=tiny:llama", "task.kind=causal_lm"],
    "smollm2": ["model.source=smollm2", "task.kind=causal_lm"],
}
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]


def build(args: argparse.Namespace, k: int):
    """The quickstart's data and recipe on the chosen model, and K LoRA trials of one cell."""
    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.space import expand_trials
    from lorasweep.workbench import load_workbench

    # dropout off: the stock PEFT loop below trains in eval mode, and the two are compared for
    # identical losses (a throughput benchmark; benchmarks/peer_curve.py compares curves)
    overrides = [*MODELS[args.model], f"train.steps={args.steps}", "task.max_eval_examples=128",
                 "task.validation_size=128", f"train.precision={args.precision}",
                 "train.dropout=off",
                 f"search.methods=[{{name: lora, lr: {LRS[:k]}}}]"]
    study = load_study(resolve_study_path("quickstart"), overrides)
    return study, load_workbench(study), expand_trials(study)


def run_lorasweep(args: argparse.Namespace, k: int, group: int) -> dict:
    """lorasweep's own training of K trials, `group` of them fused at a time."""
    import torch

    study, bench, trials = build(args, k)
    device = torch.device(args.device)
    started = time.perf_counter()
    losses = train_fused(bench.base, bench.task, study.train, trials, device, group)
    return {"seconds": synchronized(device, started), "losses": losses}


def train_fused(base: nn.Module, task: Task, train: TrainSpec, trials: list[TrialSpec],
                device: torch.device, group: int) -> list[float]:
    """Train `trials` with lorasweep, `group` of them fused at a time; their final train losses."""
    from lorasweep.train import train_group

    losses = []
    for first in range(0, len(trials), group):
        results = train_group(base, task, train, trials[first:first + group], device)
        losses += [r.train_loss for r in results]
    return losses


def run_peft_loop(args: argparse.Namespace, k: int) -> dict:
    """Stock PEFT, one trial after another (see `train_peft`)."""
    import torch

    study, bench, trials = build(args, k)
    device = torch.device(args.device)
    started = time.perf_counter()
    losses = train_peft(bench.base, bench.task, study.train, trials, device)
    return {"seconds": synchronized(device, started), "losses": losses}


def train_peft(base: nn.Module, task: Task, train: TrainSpec, trials: list[TrialSpec],
               device: torch.device) -> list[float]:
    """Stock PEFT, one trial after another: the loop a user would write by hand (AdamW, warmup +
    cosine) on the same batches, under the same autocast, micro-batches (`train.grad_accum`)
    and block checkpointing (`train.gradient_checkpointing`) as lorasweep, on the same device.
    Returns each trial's last train loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    from lorasweep.methods.targets import resolve_targets
    from lorasweep.optim import total_steps
    from lorasweep.precision import autocast
    from lorasweep.tasks.base import accumulate_gradients
    from lorasweep.train import checkpoint_blocks
    from lorasweep.workbench import batch_order

    steps = total_steps(train, len(task.train))
    kind = "SEQ_CLS" if hasattr(task, "label_names") else "CAUSAL_LM"
    losses = []
    for trial in trials:
        torch.manual_seed(trial.seed)
        config = LoraConfig(r=trial.cell.rank, lora_alpha=trial.cell.alpha, lora_dropout=0.0,
                            target_modules=resolve_targets(base, "all-linear"), task_type=kind)
        peft_model = get_peft_model(copy.deepcopy(base), config).to(device)
        if train.gradient_checkpointing:
            checkpoint_blocks(peft_model.get_base_model())
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                      lr=trial.lr)
        schedule = get_scheduler("cosine", optimizer, num_warmup_steps=int(0.1 * steps),
                                 num_training_steps=steps)
        everyone = torch.ones(1, dtype=torch.bool, device=device)
        for index in batch_order(len(task.train), train.batch_size, steps, trial.seed):
            loss = accumulate_gradients(peft_model, task, index, 1, train, everyone)[0]
            torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        with autocast(train, device):
            for split in (task.validation, task.test):
                if split is not None:
                    task.evaluate(peft_model, split, 1, train.eval_batch_size, device)
        losses.append(float(loss))
    return losses


def synchronized(device, started: float) -> float:
    """Seconds since `started`, once the device has finished its queued work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def child(args: argparse.Namespace) -> None:
    import torch

    if args.mode == "peft":
        out = run_peft_loop(args, args.k)
    else:
        out = run_lorasweep(args, 1, 1) if args.mode == "single" else \
            run_lorasweep(args, args.k, args.group)
    out["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out))


def measure(args: argparse.Namespace, model: str, mode: str, group: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model", model,
               "--steps", str(args.steps), "--k", str(args.k), "--group", str(group),
               "--device", args.device, "--precision", args.precision]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{mode} (group {group}) failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def report(args: argparse.Namespace, model: str) -> None:
    """Every mode in its own process, then the ratios against stock PEFT and one by one."""
    runs = {"peft": measure(args, model, "peft"), "single": measure(args, model, "single")}
    for group in sorted({1, *args.groups}):
        runs[group] = measure(args, model, "lorasweep", group)
    from lorasweep.config import load_study, resolve_study_path

    train = load_study(resolve_study_path("quickstart")).train
    tokens = args.k * args.steps * train.batch_size * train.seq_len
    memory = "GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"\n{model} on {args.device} ({args.precision}): K = {args.k} LoRA trials, "
          f"{args.steps} steps of {train.batch_size} x {train.seq_len} tokens each")
    peft, single = runs["peft"], runs["single"]
    rows = [("stock PEFT, one by one", peft)]
    rows += [("lorasweep, one by one" if g == 1 else f"lorasweep, groups of {g}", runs[g])
             for g in sorted({1, *args.groups})]
    for label, run in rows:
        print(f"  {label:26s} {run['seconds']:7.1f} s  {tokens / run['seconds']:8.0f} train "
              f"tokens/s  {peft['seconds'] / run['seconds']:5.2f}x PEFT  "
              f"{runs[1]['seconds'] / run['seconds']:5.2f}x 1-by-1  {memory} "
              f"{run['peak_mb']:6.0f} MB = {run['peak_mb'] / single['peak_mb']:.2f}x one trial")
    print(f"  a single lorasweep trial: {single['seconds']:.1f} s, {memory} "
          f"{single['peak_mb']:.0f} MB")
    for group in args.groups:
        pairs = zip(runs[group]["losses"], runs[1]["losses"], strict=True)
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        print(f"  final train loss, groups of {group} vs 1-by-1: max relative difference "
              f"{worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all",
                        help="all: minilm and tiny-lm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--groups", type=int, nargs="+", default=[8],
                        help="fused group sizes to time (default: 8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", dest="mode", choices=["lorasweep", "peft", "single"])
    parser.add_argument("--group", type=int, default=1)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    for model in ("minilm", "tiny-lm") if args.model == "all" else [args.model]:
        report(args, model)


if __name__ == "__main__":
    main()
