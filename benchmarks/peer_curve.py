"""Does lorasweep's LR curve match a plain stock-PEFT training loop's? (issue 27)

The same LoRA cells on the same data and splits, trained two ways at every (seed, LR):

- plain: what a user writes: transformers' AutoModelForSequenceClassification (head drawn by
  transformers after `transformers.set_seed`), PEFT's LoraConfig (task_type SEQ_CLS, so the head
  is a `modules_to_save` copy), torch AdamW, transformers' `get_scheduler`, `model.train()`
  (the model's dropout on), a shuffled DataLoader, validation loss in `model.eval()`;
- lorasweep: the study's trials as `lorasweep run` trains them (the LRs of a seed fused in one
  group), once per `--lorasweep-dropout` setting.

Per (cell, LR) it prints each side's mean validation loss over the seeds, the plain loop's seed
range, and whether lorasweep's mean lies inside it.

With `--paired` the plain loop takes each trial's random draws from lorasweep instead of its own:
the head and adapter weights the trial starts from, its batch order, and its dropout masks
(the global generator seeded as lorasweep seeds each step). Everything that trains stays stock
(PEFT's model, torch AdamW, transformers' schedule), so the two sides differ only in the training
code, and the table adds the largest per-seed difference of the two losses: a difference at
rounding level says that any gap left without `--paired` comes from the random draws alone.

Defaults: the small configuration recorded
in benchmarks/README.md (MiniLM, built-in shakespeare-genre task, rank 4, lora_alpha 16,
q/v, 50 steps of 16 x 48 tokens); the quickstart's cell is `--dataset builtin:shakespeare-plays
--ranks 8 --alphas 16 --targets all-linear --steps 40 --grad-clip 1 --lrs 1e-3 3.16e-3 1e-2`.

    .venv/bin/python benchmarks/peer_curve.py --lorasweep-dropout model off
    .venv/bin/python benchmarks/peer_curve.py --paired
"""

from __future__ import annotations

import argparse
import itertools
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
                  "weight_decay": 0.0, "grad_clip": args.grad_clip, "dropout": dropout,
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
            # a diverged trial has no validation loss: NaN, shown as diverged in the table
            out[key] = result.metrics["eval_loss"] if result.status == "complete" else math.nan
    return out


def lorasweep_starts(study, bench) -> dict[tuple[int, float, int], dict]:
    """The trainable weights each (cell, seed) starts from in lorasweep, by PEFT's names."""
    from lorasweep.space import expand_trials
    from lorasweep.workbench import attach_group

    starts = {}
    for trial in expand_trials(study, None):
        key = (trial.cell.rank, trial.cell.alpha, trial.seed)
        if key not in starts:
            _, attached = attach_group(bench.base, bench.task, study.train, [trial])
            starts[key] = {name: param.detach().clone()
                           for name, param in attached.trial_params[0]}
    return starts


def lorasweep_name(peft_name: str) -> str:
    """A PEFT parameter name as lorasweep names the same weight."""
    return (peft_name.removeprefix("base_model.model.")
            .replace(".lora_A.default.weight", ".lora_A")
            .replace(".lora_B.default.weight", ".lora_B")
            .replace(".modules_to_save.default", ""))


def plain_batches(args: argparse.Namespace, train, seed: int, paired: bool):
    """(ids, mask, labels) of each step, padded to the batch's longest row as a padding collator
    pads: a shuffled DataLoader's order, or with `paired` lorasweep's order for the seed."""
    import torch
    from torch.utils.data import DataLoader

    from lorasweep.workbench import batch_order

    if paired:
        order = batch_order(len(train.labels), args.batch_size, args.steps, seed)
    else:
        loader = DataLoader(range(len(train.labels)), batch_size=args.batch_size, shuffle=True,
                            drop_last=True, generator=torch.Generator().manual_seed(seed))
        order = (index for _ in range(args.steps) for index in loader)
    for index in itertools.islice(order, args.steps):
        mask = train.attention_mask[index]
        length = int(mask.sum(1).max())
        yield train.input_ids[index, :length], mask[:, :length], train.labels[index]


def plain_loss(args: argparse.Namespace, task, rank: int, alpha: float, lr: float,
               seed: int, start: dict | None = None, dropout: bool = True) -> float:
    """One run of the loop a user writes with stock transformers + PEFT + torch (training in
    `model.train()`, or with `dropout` False in `model.eval()`); given `start` (lorasweep's
    initial weights), paired with lorasweep's trial of that seed."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from lorasweep.dropout import step_seed
    from lorasweep.packaged_models import packaged_model_path

    transformers.set_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        packaged_model_path("minilm"), num_labels=len(task.label_names))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets(args),
                        lora_dropout=args.lora_dropout, task_type="SEQ_CLS")
    model = get_peft_model(model, config)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if start is not None:
        assert {lorasweep_name(n) for n in trainable} == set(start), "the weights do not pair"
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(start[lorasweep_name(name)])
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0)
    schedule = transformers.get_scheduler(
        "cosine", optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * args.steps),
        num_training_steps=args.steps)
    model.train(dropout)
    for step, (ids, mask, labels) in enumerate(
            plain_batches(args, task.train, seed, start is not None), 1):
        if start is not None:  # lorasweep's dropout masks: the generator as it seeds a step
            torch.manual_seed(step_seed(seed, step))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if args.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), args.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
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
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="clip each trial's gradient norm, on both sides (the quickstart: 1)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="PEFT's lora_dropout, on both sides")
    parser.add_argument("--lorasweep-dropout", nargs="+", default=["model"],
                        choices=["model", "off"], help="lorasweep's train.dropout settings to run")
    parser.add_argument("--paired", action="store_true",
                        help="the plain loop takes lorasweep's initial weights, batch order and "
                             "dropout masks (one --lorasweep-dropout setting, which it follows)")
    parser.add_argument("--validation-size", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.paired and len(args.lorasweep_dropout) != 1:
        parser.error("--paired follows one --lorasweep-dropout setting")

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
    starts = (lorasweep_starts(study_for(args, args.lorasweep_dropout[0]), bench)
              if args.paired else {})
    plain = {}
    for rank, alpha in cells:
        for lr in args.lrs:
            for seed in args.seeds:
                plain[(rank, alpha, lr, seed)] = plain_loss(
                    args, bench.task, rank, alpha, lr, seed, starts.get((rank, alpha, seed)),
                    dropout=args.lorasweep_dropout != ["off"] or not args.paired)
    print(f"plain loop: {time.perf_counter() - started:.0f} s", flush=True)

    side = "plain (paired)" if args.paired else "plain"
    header = f"| cell | LR | {side} mean [min, max] |"
    for dropout in args.lorasweep_dropout:
        header += f" lorasweep dropout={dropout} mean [min, max] | within? |"
    if args.paired:
        header += " largest per-seed difference |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for rank, alpha in cells:
        for lr in args.lrs:
            theirs = [plain[(rank, alpha, lr, s)] for s in args.seeds]
            row = f"| r={rank} alpha={alpha:g} | {lr:g} | {_summary(theirs)} |"
            for dropout in args.lorasweep_dropout:
                mine = [ours[dropout][(rank, alpha, lr, s)] for s in args.seeds]
                if any(map(math.isnan, mine + theirs)):
                    inside = "n/a"
                else:
                    inside = "yes" if min(theirs) <= statistics.mean(mine) <= max(theirs) else "no"
                row += f" {_summary(mine)} | {inside} |"
            if args.paired:
                row += f" {max(abs(a - b) for a, b in zip(mine, theirs, strict=True)):.2e} |"
            print(row)
    print(f"total {time.perf_counter() - started:.0f} s")


def _summary(values: list[float]) -> str:
    diverged = sum(map(math.isnan, values))
    if diverged:
        return f"diverged in {diverged} of {len(values)} seeds"
    return f"{statistics.mean(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


if __name__ == "__main__":
    main()
