"""Pretrain the vision demo's base model "digits-vit" on the built-in digits 0-4.

Why
---
A LoRA sweep needs a pretrained base whose features the tuning adapts; a randomly initialized
model would make LoRA and full fine-tuning a test of training from scratch. No pretrained image
model ships offline, so this script makes a tiny one: a 4-layer ViT (8x8 pixels, patches of
2x2, width 64, 136k parameters) trained from scratch on ``builtin:digits-0-4``. The vision demo
(``lorasweep run vision``) then tunes it on ``builtin:digits-5-9``, digits it has never seen,
with a fresh head.

How
---
The images go through lorasweep's own loading (the same pixel values a study sees: RGB,
rescaled and normalized to [-1, 1] by the saved image processor). Then, with one torch thread
and a fixed seed, so that re-running gives the same weights: AdamW at LR, STEPS steps of BATCH
images, linear warmup and cosine decay. It prints the accuracy on the 90 validation images
(carved from the training split) and on the test split, and saves ``config.json``,
``model.safetensors`` and ``preprocessor_config.json`` in ``src/lorasweep/data/digits_vit``.

Usage::

    python scripts/build_digits_base.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from lorasweep.config import ModelSpec, SearchSpec, Study, TaskSpec, TrainSpec
from lorasweep.packaged_models import DIGITS_VIT_DIR
from lorasweep.tasks import build_task
from lorasweep.tasks.base import Split

SEED = 0
STEPS = 1200
BATCH = 32
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.05
# The study whose images the base learns from, read through lorasweep's own loading (a task's
# builder reads the study it belongs to); its model and recipe are this script's own.
STUDY = Study(name="digits-vit", seed=SEED, model=ModelSpec(source="tiny:vit"),
              task=TaskSpec(kind="image_classification", dataset="builtin:digits-0-4",
                            validation_size=90),
              train=TrainSpec(steps=STEPS, batch_size=BATCH),
              search=SearchSpec(methods=["full"], lr=[LR]))
CONFIG = dict(image_size=8, patch_size=2, num_channels=3, hidden_size=64, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=128)


def accuracy(model: ViTForImageClassification, split: Split) -> float:
    """The share of `split` the model classifies right."""
    with torch.no_grad():
        logits = model(pixel_values=split.inputs["pixel_values"]).logits
    return (logits.argmax(-1) == split.labels).float().mean().item()


def build(out_dir: Path) -> None:
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    torch.manual_seed(SEED)
    processor = ViTImageProcessorPil(size={"height": 8, "width": 8},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    task = build_task(STUDY, processor)
    names = task.label_names
    model = ViTForImageClassification(ViTConfig(
        **CONFIG, id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / WARMUP, 0.5 * (1 + math.cos(math.pi * step / STEPS))))
    generator = torch.Generator().manual_seed(SEED)
    pixels, labels = task.train.inputs["pixel_values"], task.train.labels
    model.train()
    for step in range(STEPS):
        index = torch.randint(len(labels), (BATCH,), generator=generator)
        loss = model(pixel_values=pixels[index], labels=labels[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}: training loss {loss.item():.4f}")
    model.eval()
    print(f"validation accuracy {accuracy(model, task.validation):.4f} "
          f"({len(task.validation)} images), test accuracy {accuracy(model, task.test):.4f} "
          f"({len(task.test)} images)")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DIGITS_VIT_DIR,
                        help=f"where the model goes (default {DIGITS_VIT_DIR})")
    build(parser.parse_args().out)
