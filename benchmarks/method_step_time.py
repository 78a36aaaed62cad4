"""Training-step time of each method relative to LoRA's, ours and PEFT's, measured in one run.

One step = forward, backward and AdamW update on the quickstart's batch (16 x 48 tokens of the
built-in task) on MiniLM. Methods are timed in interleaved rounds so that load from elsewhere on
the machine falls on all of them alike; the median step of each is reported.

    .venv/bin/python benchmarks/method_step_time.py [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ours(base, method: str, init: str):
    from lorasweep.methods import get_method
    from lorasweep.space import Cell

    model = copy.deepcopy(base)
    cell = Cell(method=method, rank=8, lora_alpha="16", init=init, target_modules="all-linear")
    attached = get_method(method).attach(model, cell, 1, torch.Generator().manual_seed(0))
    return model, [p for _, p in attached.trial_params[0]]


def peft(base, **kwargs):
    from peft import LoraConfig, get_peft_model

    from lorasweep.methods.targets import resolve_targets

    config = LoraConfig(r=8, lora_alpha=16, target_modules=resolve_targets(base, "all-linear"),
                        task_type="SEQ_CLS", **kwargs)
    model = get_peft_model(copy.deepcopy(base), config)
    return model, [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.workbench import load_workbench

    study = load_study(resolve_study_path("quickstart"))
    bench = load_workbench(study)
    base, task = bench.base, bench.task
    batch = task.train.batch(torch.arange(study.train.batch_size), 1)
    setups = {
        "lorasweep LoRA": ours(base, "lora", "kaiming"),
        "lorasweep DoRA": ours(base, "dora", "kaiming"),
        "lorasweep PiSSA": ours(base, "pissa", "pissa"),
        "PEFT LoRA": peft(base),
        "PEFT DoRA": peft(base, use_dora=True),
    }
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4) for name, (_, params) in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}

    def step(name: str) -> float:
        model = setups[name][0]
        started = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        task.trial_losses(logits, batch["labels"], 1).sum().backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        return time.perf_counter() - started

    for name in setups:  # warm-up
        step(name)
    for _ in range(args.rounds):
        for name in setups:
            times[name] += [step(name) for _ in range(args.steps)]
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"median step over {args.rounds} x {args.steps} steps, batch "
          f"{study.train.batch_size} x {study.train.seq_len} tokens, MiniLM, rank 8, all linear")
    for name, value in median.items():
        reference = median["PEFT LoRA" if name.startswith("PEFT") else "lorasweep LoRA"]
        print(f"  {name:16s} {value * 1000:7.1f} ms   {value / reference:5.2f}x its LoRA")
    print(f"  lorasweep DoRA / PEFT DoRA: {median['lorasweep DoRA'] / median['PEFT DoRA']:.2f}x")


if __name__ == "__main__":
    main()
