"""Sequence classification: cross-entropy training, accuracy and eval loss on held-out data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from lorasweep.config import TaskSpec
from lorasweep.errors import StudyError
from lorasweep.tasks.base import Split, Task, per_trial
from lorasweep.tasks.data import RawSplits, Records, require_field


class ClassificationTask(Task):
    """Reports eval_loss and accuracy."""

    def __init__(self, train: Split, validation: Split, test: Split | None,
                 label_names: list[str]) -> None:
        super().__init__(train, validation, test)
        self.label_names = label_names

    def trial_losses(self, logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        per_item = F.cross_entropy(logits.float(), labels.repeat(k), reduction="none")
        return per_trial(per_item, k, "mean")

    def loss_count(self, labels: torch.Tensor) -> int:
        return labels.shape[0]

    def eval_terms(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, int, torch.Tensor]:
        per_item = F.cross_entropy(logits.float(), labels.repeat(k), reduction="none")
        hits = (logits.argmax(-1) == labels.repeat(k)).float()
        return per_trial(per_item, k), labels.shape[0], per_trial(hits, k)

    def summarize(self, loss_sum: torch.Tensor, count: int, correct: torch.Tensor) -> list[dict]:
        return [{"eval_loss": float(loss) / count, "accuracy": float(hits) / count}
                for loss, hits in zip(loss_sum, correct, strict=True)]


def build_classification(spec: TaskSpec, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
                         seq_len: int) -> ClassificationTask:
    for field, setting in ((spec.text_field, "task.text_field"),
                           (spec.label_field, "task.label_field")):
        require_field(raw, field, setting)
    label_names = sorted({str(r[spec.label_field]) for r in raw.train})
    if len(label_names) < 2:
        raise StudyError(f"task.label_field: '{spec.label_field}' has one class; need at least 2")
    ids = {name: i for i, name in enumerate(label_names)}

    def tokenize(records: Records, split: str) -> Split:
        unknown = {str(r[spec.label_field]) for r in records} - set(ids)
        if unknown:
            raise StudyError(f"task: the {split} split has labels the training data lacks: "
                             f"{', '.join(sorted(unknown)[:5])}")
        enc = tokenizer([str(r[spec.text_field]) for r in records], truncation=True,
                        max_length=seq_len, padding="max_length", return_tensors="pt")
        labels = torch.tensor([ids[str(r[spec.label_field])] for r in records])
        return Split(enc["input_ids"], enc["attention_mask"], labels)

    test = None if raw.test is None else tokenize(raw.test, "test")
    return ClassificationTask(tokenize(raw.train, "train"), tokenize(raw.validation, "validation"),
                              test, label_names)
