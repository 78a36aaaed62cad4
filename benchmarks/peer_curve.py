"""Does lorasweep's LR curve match a plain stock-PEFT training loop's? (issue 27)

The same LoRA cells on the same data and splits, trained two ways at every (seed, LR):

- plain: what a user writes: transformers' AutoModelForSequenceClassification (head drawn by
  transformers after `transformers.set_seed`), PEFT's LoraConfig (task_type SEQ_CLS, so the head
  is a `modules_to_save` copy), torch AdamW, transformers' `get_scheduler`, `model.train()`
  (the model's dropout on), a shuffled DataLoader, validation loss in `model.eval()`;
- lorasweep: the study's trials as `lorasweep run` trains them (the LRs of a seed fused in one
  group), once per `--lorasweep-dropout` setting.

Per (cell, LR) it prints each side's mean validation loss over the seeds, the plain loop's seed
range, and whether lorasweep's mean lies inside it. Defaults: the small configuration recorded
in benchmarks/README.md (MiniLM, built-in shakespeare-genre task, rank 4, lora_alpha 16,
q/v, 50 steps of 16 x 48 tokens); the quickstart's cell is `--dataset builtin:shakespeare-plays
--ranks 8 --alphas 16 --targets all-linear --steps 40`.

    .venv/bin/python benchmarks/peer_curve.py --lorasweep-dropout model off
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def targets(args: argparse.Namespace) -> str | list[str]:
    """Module names, or one preset PEFT also knows (all-linear) as the text itself."""
    return args.targets[0] if args.targets == ["all-linear"] else args.targets


def study_for(args: argparse.Namespace, dropout: str):
    from lorasweep.config import validate_study

    return validate_study({
        "name": "peer-curve", "seed": 0,
        "model": {"source": "minilm"},
        "task": {"kind": "classification", "dataset": args.dataset,
                 "validation_size": args.validation_size,
                 "max_eval_examples": args.validation_size},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "warmup_ratio": args.warmup_ratio, "schedule": "cosine",
                  "weight_decay": 0.0, "grad_clip": None, "dropout": dropout,
                  "lora_dropout": args.lora_dropout},
        "search": {"methods": ["lora"], "ranks": args.ranks, "lora_alpha": args.alphas,
                   "lr": args.lrs, "seeds": args.seeds, "target_modules": targets(args)},
    }, "peer_curve")


def lorasweep_losses(study, bench) -> dict[tuple[int, float, float, int], float]:
    """Validation loss of every trial, trained as the runner trains them (a seed's LRs fused)."""
    import torch

    from lorasweep.space import expand_trials
    from lorasweep.train import train_group

    groups: dict[str, list] = {}
    for trial in expand_trials(study, None):
        groups.setdefault(trial.group_key, []).append(trial)
    out = {}
    for group in groups.values():
        results = train_group(bench.base, bench.task, study.train, group, torch.device("cpu"))
        for trial, result in zip(group, results, strict=True):
            key = (trial.cell.rank, trial.cell.alpha, trial.lr, trial.seed)
            out[key] = result.metrics["eval_loss"]
    return out


def plain_loss(args: argparse.Namespace, task, rank: int, alpha: float, lr: float,
               seed: int) -> float:
    """One run of the loop a user writes with stock transformers + PEFT + torch."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset

    from lorasweep.packaged_models import packaged_model_path

    transformers.set_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        packaged_model_path("minilm"), num_labels=len(task.label_names))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets(args),
                        lora_dropout=args.lora_dropout, task_type="SEQ_CLS")
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=0.0)
    schedule = transformers.get_scheduler(
        "cosine", optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * args.steps),
        num_training_steps=args.steps)
    train = task.train
    data = DataLoader(TensorDataset(train.input_ids, train.attention_mask, train.labels),
                      batch_size=args.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
    model.train()
    step = 0
    while step < args.steps:
        for ids, mask, labels in data:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    model.eval()
    split, total = task.validation, 0.0
    with torch.no_grad():
        for start in range(0, len(split), 64):
            part = slice(start, start + 64)
            logits = model(input_ids=split.input_ids[part],
                           attention_mask=split.attention_mask[part]).logits
            total += float(torch.nn.functional.cross_entropy(logits, split.labels[part],
                                                             reduction="sum"))
    return total / len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="builtin:shakespeare-genre",
                        help="builtin:shakespeare-plays is the quickstart's task")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4])
    parser.add_argument("--alphas", type=float, nargs="+", default=[16.0])
    parser.add_argument("--targets", nargs="+", default=["query", "value"],
                        help="module names, or all-linear (the quickstart's)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="PEFT's lora_dropout, on both sides")
    parser.add_argument("--lorasweep-dropout", nargs="+", default=["model"],
                        choices=["model", "off"], help="lorasweep's train.dropout settings to run")
    parser.add_argument("--validation-size", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    import transformers

    from lorasweep.workbench import load_workbench

    transformers.logging.set_verbosity_error()  # the head "newly initialized" notice, per run
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bench = load_workbench(study_for(args, "model"))
    ours = {}
    for dropout in args.lorasweep_dropout:
        ours[dropout] = lorasweep_losses(study_for(args, dropout), bench)
        print(f"lorasweep dropout={dropout}: {time.perf_counter() - started:.0f} s", flush=True)
    cells = sorted({key[:2] for key in next(iter(ours.values()))})
    plain = {}
    for rank, alpha in cells:
        for lr in args.lrs:
            for seed in args.seeds:
                plain[(rank, alpha, lr, seed)] = plain_loss(args, bench.task, rank, alpha, lr,
                                                            seed)
    print(f"plain loop: {time.perf_counter() - started:.0f} s", flush=True)

    header = "| cell | LR | plain mean [min, max] |"
    for dropout in args.lorasweep_dropout:
        header += f" lorasweep dropout={dropout} mean [min, max] | within? |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for rank, alpha in cells:
        for lr in args.lrs:
            theirs = [plain[(rank, alpha, lr, s)] for s in args.seeds]
            row = f"| r={rank} alpha={alpha:g} | {lr:g} | {_summary(theirs)} |"
            for dropout in args.lorasweep_dropout:
                mine = [ours[dropout][(rank, alpha, lr, s)] for s in args.seeds]
                inside = min(theirs) <= statistics.mean(mine) <= max(theirs)
                row += f" {_summary(mine)} | {'yes' if inside else 'no'} |"
            print(row)
    print(f"total {time.perf_counter() - started:.0f} s")


def _summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


if __name__ == "__main__":
    main()
