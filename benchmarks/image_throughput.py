"""Images/s of one image-classification LoRA trial: lorasweep's engine against a plain PEFT loop.

Both train the same model on the same images with the same recipe (LoRA rank 8, lora_alpha 2r,
every linear layer outside the head, the head trained fully; AdamW, 10% warmup + cosine, grad
clip 1.0, the same batches in the same order), then evaluate the validation and test splits:

- lorasweep: `lorasweep.train.train_group` on the task as `load_workbench` builds it (each image
  decoded and run through the image processor once per dataset, kept as one tensor split);
- plain: what a user writes after transformers' image-classification example: a torch
  `Dataset` whose `__getitem__` decodes the image and applies the model's image processor,
  a `DataLoader` (`--workers` processes, default 0 as in `TrainingArguments`), PEFT's
  `get_peft_model` with `LoraConfig(modules_to_save=["classifier"])`, `torch.optim.AdamW` and
  transformers' `get_scheduler("cosine")`.

The two alternate in one process, `--repeats` times each (order swapped every repeat), and the
script prints the median images/s of each (training images over the trial's wall time, its
evaluation included), their ratio, and both final training losses. lorasweep's one-time
preprocessing of the dataset is timed too and shown charged to a single trial (in a sweep it is
paid once for every trial of the study).

Models: `digits-vit` (packaged: 8x8 pixels, 2x2 patches, width 64, 4 layers) and `vit-224` (a
ViT built from a config at ViT's real input size: 224x224 pixels, 16x16 patches, 197 tokens, width
192, 4 layers, 3 heads, random weights, saved with its `ViTImageProcessor` to a temporary
folder). Data: `builtin:digits-5-9` (717 8x8 PNGs, 150 carved for validation, 179 test),
upscaled by the processor to the model's size as CIFAR-10 is for ViT-B/16.

    .venv/bin/python benchmarks/image_throughput.py                     # both models
    .venv/bin/python benchmarks/image_throughput.py --model vit-224 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    # name: (steps, batch size) a default run trains each trial for
    "digits-vit": (60, 32),
    "vit-224": (20, 16),
}
LR = 1e-2  # the vision demo's LoRA optimum (README, "Vision quickstart")


def vit_224(folder: Path) -> str:
    """A ViT at its published input size with small dims, and its image processor, saved."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=4,
                       num_attention_heads=3, intermediate_size=768, num_labels=5)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return str(folder)


def build(source: str, steps: int, batch_size: int):
    """The vision demo's study on `source`: its base, task (timed) and one LoRA trial."""
    from lorasweep.config import load_study, resolve_study_path
    from lorasweep.models import load_model, load_preprocessor
    from lorasweep.space import expand_trials
    from lorasweep.tasks import build_task, num_labels

    overrides = [f"model.source={source}", f"train.steps={steps}",
                 f"train.batch_size={batch_size}",
                 f"search.methods=[{{name: lora, lr: [{LR}]}}]"]
    study = load_study(resolve_study_path("vision"), overrides)
    started = time.perf_counter()
    processor = load_preprocessor(study.model, study.task.kind)
    task = build_task(study, processor)
    preprocessing = time.perf_counter() - started
    base = load_model(study.model, study.task.kind, num_labels(task), processor)
    [trial] = expand_trials(study)
    return study, task, base, trial, preprocessing


def run_lorasweep(base, task, train, trial) -> tuple[float, float]:
    """One trial through lorasweep's engine, as the runner trains it: the time its last step
    ended (perf_counter) and its last train loss."""
    from lorasweep.train import train_group

    trained = [0.0]

    def progress(step: int, steps: int) -> None:
        trained[0] = time.perf_counter()

    [result] = train_group(base, task, train, [trial], torch.device("cpu"), progress)
    return trained[0], result.train_loss


class ImageDataset(torch.utils.data.Dataset):
    """Rows as `datasets` stores them (PNG bytes, label name), decoded and processed per item."""

    def __init__(self, records: list[dict], processor, classes: dict[str, int]) -> None:
        self.records, self.processor, self.classes = records, processor, classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        record = self.records[i]
        image = Image.open(io.BytesIO(record["image"]["bytes"])).convert("RGB")
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "labels": self.classes[record["label"]]}


def run_plain(source: str, base, raw, classes: dict[str, int], train, trial, workers: int
              ) -> tuple[float, float]:
    """One trial as a user writes it with PEFT and torch: the time its last step ended and its
    last train loss."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor, get_scheduler

    from lorasweep.optim import total_steps
    from lorasweep.packaged_models import packaged_model_path
    from lorasweep.workbench import batch_order

    folder = source if Path(source).is_dir() else packaged_model_path(source)
    processor = AutoImageProcessor.from_pretrained(folder)
    data = {name: ImageDataset(records, processor, classes)
            for name, records in (("train", raw.train), ("validation", raw.validation),
                                  ("test", raw.test))}
    steps = total_steps(train, len(data["train"]))
    # the same batches in the same order as lorasweep's trial
    order = [index.tolist() for index in batch_order(len(data["train"]), train.batch_size,
                                                     steps, trial.seed)]
    loader = DataLoader(data["train"], batch_sampler=order, num_workers=workers)
    torch.manual_seed(trial.seed)
    model = copy.deepcopy(base)
    with torch.no_grad():  # a fresh head, as transformers draws one for a new label set
        model.classifier.weight.normal_(0.0, model.config.initializer_range)
        model.classifier.bias.zero_()
    config = LoraConfig(r=trial.cell.rank, lora_alpha=trial.cell.alpha, lora_dropout=0.0,
                        target_modules="all-linear", modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=trial.lr, weight_decay=train.weight_decay)
    schedule = get_scheduler("cosine", optimizer,
                             num_warmup_steps=int(train.warmup_ratio * steps),
                             num_training_steps=steps)
    model.train()
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    trained = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for split in ("validation", "test"):
            for batch in DataLoader(data[split], batch_size=train.eval_batch_size,
                                    num_workers=workers):
                model(**batch)
    return trained, loss.item()


def report(args: argparse.Namespace, model: str, folder: Path) -> None:
    from lorasweep.tasks.data import load_splits

    steps, batch_size = MODELS[model]
    steps, batch_size = args.steps or steps, args.batch_size or batch_size
    source = vit_224(folder / "vit-224") if model == "vit-224" else model
    study, task, base, trial, preprocessing = build(source, steps, batch_size)
    raw = load_splits(study.task, study.seed)
    classes = {name: i for i, name in enumerate(task.label_names)}
    images = steps * batch_size
    # per way: seconds to the end of the last training step, and to the end of the trial
    train_s: dict[str, list[float]] = {"lorasweep": [], "plain": []}
    trial_s: dict[str, list[float]] = {"lorasweep": [], "plain": []}
    losses: dict[str, list[float]] = {"lorasweep": [], "plain": []}
    ways = {"lorasweep": lambda: run_lorasweep(base, task, study.train, trial),
            "plain": lambda: run_plain(source, base, raw, classes, study.train, trial,
                                       args.workers)}
    for repeat in range(args.repeats):
        for way in (("lorasweep", "plain") if repeat % 2 == 0 else ("plain", "lorasweep")):
            started = time.perf_counter()
            trained, loss = ways[way]()
            trial_s[way].append(time.perf_counter() - started)
            train_s[way].append(trained - started)
            losses[way].append(loss)
            print(f"  repeat {repeat + 1} {way:9s} training {images / train_s[way][-1]:7.1f} "
                  f"images/s ({train_s[way][-1]:6.2f} s), whole trial {trial_s[way][-1]:6.2f} s"
                  f"  final train loss {loss:.4f}", flush=True)
    fast = {way: statistics.median(s) for way, s in train_s.items()}
    whole = {way: statistics.median(s) for way, s in trial_s.items()}
    pixels = "x".join(map(str, task.train.inputs["pixel_values"].shape[-2:]))
    evaluated = len(task.validation) + (len(task.test) if task.test is not None else 0)
    print(f"\n{model} ({pixels} pixels), one LoRA trial: {steps} steps of {batch_size} images "
          f"({images} images), lr {LR}, then {evaluated} validation and test images evaluated; "
          f"{torch.get_num_threads()} torch threads, plain DataLoader workers {args.workers}; "
          f"median of {args.repeats}")
    print(f"  {'':9s} {'training images/s':>18s} {'whole trial':>12s} "
          f"{'(train + eval) images/s':>24s}  final train loss")
    for way in ("plain", "lorasweep"):
        print(f"  {way:9s} {images / fast[way]:18.1f} {whole[way]:10.2f} s "
              f"{(images + evaluated) / whole[way]:24.1f}  {statistics.median(losses[way]):.4f}")
    print(f"  lorasweep / plain: {fast['plain'] / fast['lorasweep']:.2f}x training images/s, "
          f"{whole['plain'] / whole['lorasweep']:.2f}x whole trial")
    charged = whole["lorasweep"] + preprocessing
    print(f"  lorasweep's one-time preprocessing of the dataset ({len(raw.train)} + "
          f"{len(raw.validation)} + {len(raw.test or [])} images): {preprocessing:.2f} s; "
          f"charged to this one trial: {whole['plain'] / charged:.2f}x plain's whole trial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, help="default: 60 (digits-vit), 20 (vit-224)")
    parser.add_argument("--batch-size", type=int, help="default: 32 (digits-vit), 16 (vit-224)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0,
                        help="the plain loop's DataLoader worker processes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        for model in MODELS if args.model == "all" else [args.model]:
            report(args, model, Path(folder))


if __name__ == "__main__":
    main()
