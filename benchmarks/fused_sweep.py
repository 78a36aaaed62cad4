"""Fused K-trial LR sweep against the same trials run one by one with stock PEFT.

The baseline is what a user would otherwise write: for each LR, wrap a copy of the loaded base in
`peft.get_peft_model`, train it with a plain PyTorch loop (AdamW, warmup + cosine) on the same
batches, evaluate it. lorasweep trains the same K trials as one fused group. Each mode runs in its
own process so its peak memory (max RSS) is its own; the ratios printed come from one run.

    .venv/bin/python benchmarks/fused_sweep.py                 # both models, K = 8
    .venv/bin/python benchmarks/fused_sweep.py --model tiny-lm --steps 10
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

MODELS = {
    # name: (study overrides, task kind)
    "minilm": ["model.source=minilm", "task.kind=classification"],
    "tiny-lm": ["model.source=tiny:llama", "task.kind=causal_lm"],
}
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]


def build(model: str, steps: int, k: int):
    """The quickstart's data and recipe on the chosen model, and K LoRA trials of one cell."""
    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.space import expand_trials
    from lorasweep.study.runner import load_workbench

    overrides = [*MODELS[model], f"train.steps={steps}", "task.max_eval_examples=128",
                 "task.validation_size=128", f"search.methods=[{{name: lora, lr: {LRS[:k]}}}]"]
    study = load_study(resolve_study_path("quickstart"), overrides)
    return study, load_workbench(study), expand_trials(study)


def run_lorasweep(model: str, steps: int, k: int, fused: bool) -> dict:
    import torch

    from lorasweep.train import train_group

    study, bench, trials = build(model, steps, k)
    started = time.perf_counter()
    groups = [trials] if fused else [[t] for t in trials]
    losses = []
    for group in groups:
        results = train_group(bench.base, bench.task, study.train, group, torch.device("cpu"))
        losses += [r.train_loss for r in results]
    return {"seconds": time.perf_counter() - started, "losses": losses}


def run_peft_loop(model: str, steps: int, k: int) -> dict:
    """Stock PEFT, one trial after another: the loop a user would write by hand."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    from lorasweep.methods.targets import resolve_targets
    from lorasweep.train import batch_order

    study, bench, trials = build(model, steps, k)
    task, recipe = bench.task, study.train
    started = time.perf_counter()
    losses = []
    for trial in trials:
        torch.manual_seed(trial.seed)
        config = LoraConfig(r=trial.cell.rank, lora_alpha=trial.cell.alpha, lora_dropout=0.0,
                            target_modules=resolve_targets(bench.base, "all-linear"),
                            task_type="SEQ_CLS" if study.task.kind == "classification"
                            else "CAUSAL_LM")
        peft_model = get_peft_model(copy.deepcopy(bench.base), config)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                      lr=trial.lr)
        schedule = get_scheduler("cosine", optimizer, num_warmup_steps=int(0.1 * steps),
                                 num_training_steps=steps)
        for index in batch_order(len(task.train), recipe.batch_size, steps, trial.seed):
            batch = task.train.batch(index, 1)
            logits = peft_model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            loss = task.trial_losses(logits, batch["labels"], 1)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        task.evaluate(peft_model, task.validation, 1, recipe.eval_batch_size, torch.device("cpu"))
        if task.test is not None:
            task.evaluate(peft_model, task.test, 1, recipe.eval_batch_size, torch.device("cpu"))
        losses.append(float(loss))
    return {"seconds": time.perf_counter() - started, "losses": losses}


def child(args: argparse.Namespace) -> None:
    if args.mode == "peft":
        out = run_peft_loop(args.model, args.steps, args.k)
    else:
        k = 1 if args.mode == "single" else args.k
        out = run_lorasweep(args.model, args.steps, k, fused=args.mode != "sequential")
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def measure(mode: str, model: str, steps: int, k: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model", model, "--steps", str(steps),
               "--k", str(k)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--child", dest="mode", choices=["fused", "sequential", "peft", "single"])
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    for model in MODELS if args.model == "all" else [args.model]:
        runs = {mode: measure(mode, model, args.steps, args.k)
                for mode in ("peft", "sequential", "fused", "single")}
        peft, fused = runs["peft"], runs["fused"]
        print(f"\n{model}: K = {args.k} LoRA trials, {args.steps} steps each, quickstart batch")
        for mode, label in (("peft", "stock PEFT, one by one"),
                            ("sequential", "lorasweep, one by one"),
                            ("fused", f"lorasweep fused, K = {args.k}"),
                            ("single", "lorasweep, a single trial")):
            print(f"  {label:28s} {runs[mode]['seconds']:7.1f} s   peak RSS "
                  f"{runs[mode]['max_rss_mb']:6.0f} MB")
        print(f"  speed-up of fused over stock PEFT:       "
              f"{peft['seconds'] / fused['seconds']:.2f}x")
        print(f"  speed-up of fused over lorasweep 1-by-1: "
              f"{runs['sequential']['seconds'] / fused['seconds']:.2f}x")
        print(f"  peak memory, fused / single run:         "
              f"{fused['max_rss_mb'] / runs['single']['max_rss_mb']:.2f}x")
        pairs = zip(fused["losses"], runs["sequential"]["losses"], strict=True)
        worst = max(abs(a - b) / abs(b) for a, b in pairs)
        print(f"  final train loss, fused vs 1-by-1: max relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
