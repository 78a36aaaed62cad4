"""Sequence classification: cross-entropy training, accuracy and eval loss on held-out data."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from lorasweep.config import Study, TaskSpec
from lorasweep.errors import StudyError
from lorasweep.tasks.base import Split, Task, TokenSplit, per_trial
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


class Classes:
    """The classes the training data names, sorted, and labels as their ids; shared by every
    classification kind."""

    def __init__(self, raw: RawSplits, field: str) -> None:
        self.field = field
        self.names = sorted({str(r[field]) for r in raw.train})
        if len(self.names) < 2:
            raise StudyError(f"task.label_field: '{field}' has one class; need at least 2")
        self._ids = {name: i for i, name in enumerate(self.names)}

    def ids(self, records: Records, where: Callable[[int], str]) -> torch.Tensor:
        """Each record's class id; a label the training data lacks is one line naming its row
        (`where(i)`: the place of records[i])."""
        for i, record in enumerate(records):
            if str(record[self.field]) not in self._ids:
                raise StudyError(f"task.label_field: {where(i)} has label "
                                 f"'{record[self.field]}', which the training data lacks "
                                 f"(its classes: {', '.join(self.names[:10])})")
        return torch.tensor([self._ids[str(r[self.field])] for r in records])


def labelled_classes(raw: RawSplits, spec: TaskSpec, input_field: str, setting: str) -> Classes:
    """The classes of a classification kind's data, once its input field (named by `setting`)
    and its label field are known to be there."""
    for field, name in ((input_field, setting), (spec.label_field, "task.label_field")):
        require_field(raw, field, name)
    return Classes(raw, spec.label_field)


def build_classification(study: Study, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
                         seq_len: int) -> ClassificationTask:
    spec = study.task
    classes = labelled_classes(raw, spec, spec.text_field, "task.text_field")

    def tokenize(records: Records, split: str) -> TokenSplit:
        labels = classes.ids(records, partial(raw.where, split))
        enc = tokenizer([str(r[spec.text_field]) for r in records], truncation=True,
                        max_length=seq_len, padding="max_length", return_tensors="pt")
        return TokenSplit(enc["input_ids"], enc["attention_mask"], labels)

    test = None if raw.test is None else tokenize(raw.test, "test")
    return ClassificationTask(tokenize(raw.train, "training"),
                              tokenize(raw.validation, "validation"), test, classes.names)
