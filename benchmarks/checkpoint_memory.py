"""Peak memory and step time of one LoRA trial with `train.gradient_checkpointing` off and on.

One trial (rank 16, all linear layers) of a `random:` model trains a few steps on full-length
random token rows, once without and once with block checkpointing, in one process. Peak memory is
measured as in gpu_check.py: the CUDA allocator's peak on a GPU; on the CPU the process's peak
resident set (VmHWM, reset between the runs), which includes the base model and its group copy.

    .venv/bin/python benchmarks/checkpoint_memory.py                      # qwen2-0.5b on the CPU
    python benchmarks/checkpoint_memory.py --source random:llama-1b --device cuda --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_sweep import synchronized
from gpu_check import Size, peak_mb, random_task, reset_peak

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.models import load_model, load_tokenizer
from lorasweep.precision import DTYPES
from lorasweep.space import Cell, TrialSpec
from lorasweep.train import train_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="random:qwen2-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = Size(models=(args.source,), dtype=args.dtype, precision="fp32", seq_len=args.seq_len,
                batch_size=args.batch_size, steps=args.steps, rank=16, grad_accum=1)
    spec = ModelSpec(source=args.source, dtype=args.dtype)
    tokenizer = load_tokenizer(spec)
    base = load_model(spec, "causal_lm", None, tokenizer, DTYPES[args.dtype])
    task = random_task(len(tokenizer), size)
    cell = Cell(method="lora", rank=16, lora_alpha="32", init="kaiming",
                target_modules="all-linear")
    trial = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    print(f"{args.source} ({args.dtype} base) on {args.device}: one LoRA trial, {args.steps} "
          f"steps of {args.batch_size} x {args.seq_len} tokens")
    for flag in (False, True):
        train = TrainSpec(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           eval_batch_size=args.batch_size, gradient_checkpointing=flag)
        reset_peak(device)
        started = time.perf_counter()
        (result,) = train_group(base, task, train, [trial], device)
        seconds = synchronized(device, started)
        print(f"  gradient_checkpointing {flag!s:5s}: peak {peak_mb(device):8,.0f} MB, "
              f"{seconds:6.1f} s, losses {result.loss_curve}")


if __name__ == "__main__":
    main()
