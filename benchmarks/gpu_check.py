"""The prepared GPU check: stock PEFT one trial after another against lorasweep fused K = 1-8.

One command (`python benchmarks/gpu_check.py`, meant to finish in under 8 minutes on one H200):
an LR sweep of 8 LoRA trials (rank 16, all linear layers) on SmolLM2-135M (`model.source:
smollm2`, packaged) and on `random:llama-1b` (Llama-3.2-1B's architecture, random weights), each
with a bf16 base and bf16 autocast, on sequences of 512 tokens, trained four ways: stock PEFT one
by one (the loop of benchmarks/fused_sweep.py) and lorasweep with the 8 trials fused in groups of
K = 1, 2, 4 and 8; each with gradient accumulation and block checkpointing off and on.

The data are random token ids filling every position (throughput does not depend on what the
tokens say, and no row is padded), so tokens/s counts every trained token: trials x steps x
batch x sequence length, over the wall time of training and one validation pass. Peak memory is
the CUDA allocator's peak during that configuration (`torch.cuda.max_memory_allocated`, after a
reset); on the CPU it is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after returning freed memory with malloc_trim), which includes the base
model kept on the CPU. The last line is the K = 8 speed-up over stock PEFT.

`--smoke` runs the same code at tiny size on the CPU (tiny:llama, fp32, one step of 2 x 16
tokens), for the tests.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_sweep import synchronized, train_fused, train_peft

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.base import TokenSplit
from lorasweep.tasks.causal_lm import CausalLMTask

LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
GROUPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Size:
    models: tuple[str, ...]
    dtype: str
    precision: str
    seq_len: int
    batch_size: int
    steps: int
    rank: int
    grad_accum: int  # micro-batches per step in the "accum + ckpt" variant

    def variants(self) -> dict[str, dict]:
        return {"plain": dict(grad_accum=1, gradient_checkpointing=False),
                f"accum {self.grad_accum} + ckpt": dict(grad_accum=self.grad_accum,
                                                        gradient_checkpointing=True)}


FULL = Size(models=("smollm2", "random:llama-1b"), dtype="bf16", precision="bf16", seq_len=512,
            batch_size=8, steps=8, rank=16, grad_accum=4)
SMOKE = Size(models=("tiny:llama",), dtype="fp32", precision="fp32", seq_len=16, batch_size=2,
             steps=1, rank=4, grad_accum=2)


def random_task(vocab: int, size: Size) -> CausalLMTask:
    """Full-length rows of random token ids: one epoch of training, two batches to validate."""
    generator = torch.Generator().manual_seed(0)
    rows = size.batch_size * (size.steps + 2)
    ids = torch.randint(1000, vocab, (rows, size.seq_len), generator=generator)
    train = TokenSplit(ids[:-2 * size.batch_size], torch.ones_like(ids[:-2 * size.batch_size]),
                  ids[:-2 * size.batch_size])
    validation = TokenSplit(ids[-2 * size.batch_size:], torch.ones_like(ids[-2 * size.batch_size:]),
                       ids[-2 * size.batch_size:])
    return CausalLMTask(train, validation, None)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def check_model(source: str, size: Size, device: torch.device) -> list[dict]:
    """Every runner and variant on one model; one row each."""
    spec = ModelSpec(source=source, dtype=size.dtype)
    tokenizer = load_tokenizer(spec)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[size.dtype]
    base = load_model(spec, "causal_lm", None, tokenizer, dtype)
    task = random_task(len(tokenizer), size)
    cell = Cell(method="lora", rank=size.rank, lora_alpha=str(2 * size.rank), init="kaiming",
                target_modules="all-linear")
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0) for i, lr in enumerate(LRS)]
    tokens = len(trials) * size.steps * size.batch_size * size.seq_len
    rows = []
    for variant, settings in size.variants().items():
        train = TrainSpec(steps=size.steps, batch_size=size.batch_size, seq_len=size.seq_len,
                           warmup_ratio=0.1, precision=size.precision, eval_batch_size=8,
                           **settings)
        runners = [("stock PEFT, one by one", None)] + [(f"lorasweep K = {k}", k) for k in GROUPS]
        for runner, group in runners:
            reset_peak(device)
            started = time.perf_counter()
            if group is None:
                losses = train_peft(base, task, train, trials, device)
            else:
                losses = train_fused(base, task, train, trials, device, group)
            seconds = synchronized(device, started)
            rows.append(dict(model=source, variant=variant, runner=runner, group=group,
                             tokens_per_s=tokens / seconds, peak_mb=peak_mb(device),
                             losses=losses))
    return rows


def print_table(rows: list[dict], size: Size, device: torch.device) -> None:
    memory = "GPU peak MB" if device.type == "cuda" else "peak RSS MB"
    print(f"\n8 LoRA trials (rank {size.rank}), {size.steps} steps of {size.batch_size} x "
          f"{size.seq_len} tokens, base {size.dtype}, precision {size.precision}, on {device}")
    print(f"| model | variant | runner | tokens/s | vs PEFT | {memory} | vs K = 1 | "
          "final losses vs K = 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        peft = next(r for r in rows if r["model"] == row["model"]
                    and r["variant"] == row["variant"] and r["group"] is None)
        single = next(r for r in rows if r["model"] == row["model"]
                      and r["variant"] == row["variant"] and r["group"] == 1)
        print(f"| {row['model']} | {row['variant']} | {row['runner']} | "
              f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / peft['tokens_per_s']:.2f}x | "
              f"{row['peak_mb']:,.0f} | {row['peak_mb'] / single['peak_mb']:.2f}x | "
              f"{_worst_difference(row['losses'], single['losses']):.1e} |")


def _worst_difference(losses: list[float], reference: list[float]) -> float:
    """Largest relative difference between two runs' final train losses, trial by trial."""
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def speedups(rows: list[dict]) -> str:
    """The last line: K = 8 over stock PEFT, per model, without accumulation or checkpointing."""
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["group"]: r["tokens_per_s"] for r in rows
                if r["model"] == model and r["variant"] == "plain"}
        parts.append(f"{model} {mine[8] / mine[None]:.2f}x")
    return "K = 8 speed-up over stock PEFT one by one (plain): " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny size on the CPU, in seconds (for the tests)")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    rows = [row for source in size.models for row in check_model(source, size, device)]
    print_table(rows, size, device)
    print(speedups(rows))


if __name__ == "__main__":
    main()
