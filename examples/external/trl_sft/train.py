"""Supervised fine-tuning with TRL's SFTTrainer and PEFT at one learning rate, each evaluation
reported to lorasweep (lorasweep.integrations.TrainerCallback prints it as a JSON line).

A recipe: needs `pip install trl` (written for TRL 1.16) beside lorasweep and a model and
dataset it can load (hub ids or local paths). On a machine without a GPU it trains in fp32 on the
CPU. `make_tiny.py` writes a tiny model and data that run it offline in seconds (README.md).
Usage alone: python train.py --model M --dataset D --lr 2e-4 [--rank 16 --alpha 32 |
--full-finetune] [--seed 0] [--output-dir out]
"""

from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from lorasweep.integrations import TrainerCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="a hub dataset id or a JSON lines file")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--full-finetune", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--output-dir", default="out")
    args = parser.parse_args()

    local = args.dataset.endswith((".json", ".jsonl"))
    data = (load_dataset("json", data_files=args.dataset, split="train") if local
            else load_dataset(args.dataset, split="train"))
    splits = data.train_test_split(test_size=0.05, seed=0)  # the same split for every trial
    peft_config = None if args.full_finetune else LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM")
    gpu = torch.cuda.is_available()
    config = SFTConfig(output_dir=args.output_dir, learning_rate=args.lr,
                       max_steps=args.max_steps, eval_strategy="steps",
                       eval_steps=args.eval_steps, per_device_train_batch_size=8,
                       lr_scheduler_type="cosine", warmup_steps=0.03, seed=args.seed,
                       save_strategy="no", report_to=[],
                       # TRL defaults to bf16, which a CPU-only machine refuses: fp32 there
                       use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported())
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=splits["train"],
                         eval_dataset=splits["test"], peft_config=peft_config,
                         callbacks=[TrainerCallback()])
    trainer.train()
    trainer.evaluate()  # the final evaluation: the trial's result (the last line)


if __name__ == "__main__":
    main()
