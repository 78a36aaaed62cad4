"""What a task gives the trainer: tokenized splits, a loss per trial, and an evaluation per trial.

Batches reach the model as K copies of the same examples laid end to end (see methods/stacked.py),
so losses and metrics come back as one value per trial.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Split:
    """Tokenized examples padded to the study's sequence length."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N,) class ids, or (N, T) token targets with -100 where ignored

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def head(self, n: int) -> Split:
        """The first n examples (the training data is stored in seeded shuffled order, so a
        smaller head is a prefix of a larger one)."""
        return Split(self.input_ids[:n], self.attention_mask[:n], self.labels[:n])

    def batch(self, index: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """Rows `index`, trimmed to their longest sequence, inputs repeated for K trials."""
        length = int(self.attention_mask[index].sum(1).max())
        ids = self.input_ids[index, :length]
        mask = self.attention_mask[index, :length]
        labels = self.labels[index]
        if labels.ndim == 2:
            labels = labels[:, :length]
        return {"input_ids": ids.repeat(k, 1), "attention_mask": mask.repeat(k, 1),
                "labels": labels}


def per_trial(values: torch.Tensor, k: int, reduce: str = "sum") -> torch.Tensor:
    """Reduce each trial's block of a (K*...) tensor to one number, shape (K,).

    Each block is reduced on its own, so a trial's numbers do not depend on the size of its group
    (a reduction over a (K, n) view may sum in a different order for different K).
    """
    blocks = values.reshape(k, -1).unbind(0)
    return torch.stack([block.mean() if reduce == "mean" else block.sum() for block in blocks])


class Task(ABC):
    """A task kind: its data, training loss and validation metrics (config.KIND_METRICS)."""

    def __init__(self, train: Split, validation: Split, test: Split | None) -> None:
        self.train = train
        self.validation = validation
        self.test = test

    def with_train_examples(self, n: int | None) -> Task:
        """This task trained on the first n training examples (itself when n is None)."""
        if n is None:
            return self
        subset = copy.copy(self)
        subset.train = self.train.head(n)
        return subset

    @abstractmethod
    def trial_losses(self, logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """Mean training loss of each trial, shape (K,)."""

    @abstractmethod
    def loss_count(self, labels: torch.Tensor) -> int:
        """How many items `trial_losses` averages over in a batch with these labels (scored
        tokens, or examples): a micro-batch's weight in gradient accumulation."""

    @abstractmethod
    def summarize(self, loss_sum: torch.Tensor, count: int, correct: torch.Tensor) -> list[dict]:
        """Per-trial metrics from summed eval loss, the number of scored items and hits."""

    @abstractmethod
    def eval_terms(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Summed loss (K,), items scored, correct predictions (K,) for one eval batch."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, k: int, batch_size: int,
                 device: torch.device) -> list[dict]:
        """Metrics of each of the K trials on a split: eval_loss and the task's metric."""
        loss_sum = torch.zeros(k, dtype=torch.float64)
        correct = torch.zeros(k, dtype=torch.float64)
        count = 0
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            batch = {n: t.to(device) for n, t in split.batch(index, k).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            batch_loss, batch_count, batch_correct = self.eval_terms(logits, batch["labels"], k)
            loss_sum += batch_loss.double().cpu()
            correct += batch_correct.double().cpu()
            count += batch_count
        return self.summarize(loss_sum, count, correct)
