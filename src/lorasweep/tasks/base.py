"""What a task gives the trainer: splits of model inputs, a loss and an evaluation per trial.

Batches reach the model as K copies of the same examples laid end to end (see methods/stacked.py),
so losses and metrics come back as one value per trial.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorasweep.config import TrainSpec
from lorasweep.precision import autocast


class Split:
    """Examples as the model takes them: named input tensors whose first dimension is the
    example (the task chooses them: token ids and masks, pixel values, ...) and their labels.

    Training, evaluation, curvature and the memory probes call `model(**inputs)` on what `batch`
    gives, so a new kind of input needs a new Split (or none), not new training code.
    """

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels  # (N,) class ids, or (N, T) token targets with -100 where ignored

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, n: int) -> Split:
        """The first n examples (the training data is stored in seeded shuffled order, so a
        smaller head is a prefix of a larger one)."""
        part = copy.copy(self)
        part.inputs = {name: t[:n] for name, t in self.inputs.items()}
        part.labels = self.labels[:n]
        return part

    def trim(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A batch's rows cut to what they use (nothing to cut here)."""
        return inputs, labels

    def batch(self, index: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """Rows `index`, trimmed, inputs repeated for K trials (K copies end to end along the
        first dimension, as methods/stacked.py expects); `labels` once, not repeated."""
        inputs, labels = self.trim({name: t[index] for name, t in self.inputs.items()},
                                   self.labels[index])
        # the rows are already a copy (indexing copies): one trial takes them as they are
        return {**{name: t if k == 1 else t.repeat(k, *(1,) * (t.ndim - 1))
                   for name, t in inputs.items()},
                "labels": labels}


IGNORE = -100  # the label of a token no loss is taken on (PyTorch's ignore_index)


class TokenSplit(Split):
    """Tokenized examples padded on the right to the study's sequence length; a batch is trimmed
    to its longest sequence."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> None:
        super().__init__({"input_ids": input_ids, "attention_mask": attention_mask}, labels)

    @property
    def input_ids(self) -> torch.Tensor:  # (N, T)
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:  # (N, T)
        return self.inputs["attention_mask"]

    def trim(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        length = int(inputs["attention_mask"].sum(1).max())
        cut = {name: t[:, :length] for name, t in inputs.items()}
        return cut, labels[:, :length] if labels.ndim == 2 else labels


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on a batch from `Split.batch` (its inputs, without the labels).

    Floating inputs (pixel values) reach the model in the dtype its weights are stored in (a
    bf16 base's convolution refuses fp32 input; ViT casts its own, ConvNeXt does not); token
    ids pass as they are, and so does a denoiser's `timestep` (a flow schedule's is a float,
    which diffusers' scripts pass in fp32; bf16 would round 999.7 to 1000). A diffusers
    denoiser returns its prediction as `sample`, which is its logits here
    (tasks/image_generation.py)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    output = model(**{name: t.to(dtype) if t.is_floating_point() and name != "timestep" else t
                      for name, t in batch.items() if name != "labels"})
    return output.logits if hasattr(output, "logits") else output.sample


@dataclass
class OffTheRows:
    """Adaptable layers that a fused group's row split does not reach, with why. A fused group's
    adapted layer splits its input's rows among the trials, so it gives each trial its own adapter
    only where the input holds the examples' rows."""

    unused: dict[str, str] = field(default_factory=dict)  # an adapter there never trains
    shared: dict[str, str] = field(default_factory=dict)  # trials there train one at a time


@torch.no_grad()
def layers_off_the_rows(model: nn.Module, batch_of: Callable[[int], dict[str, torch.Tensor]],
                        layers: tuple[type, ...]) -> OffTheRows:
    """The `layers` that a forward does not call as modules (unused, or the model reads the
    weight itself: torch's MultiheadAttention and its out_proj), and those it calls on a tensor
    whose first dimension is not the batch's rows times a constant: a table shared by all
    examples (Swin v2's relative-position MLP), or time-major rows (XLNet's (sequence, batch)).
    `batch_of(n)`: n rows of the task's inputs; forwards on 2 and 3 rows tell the two apart."""
    seen: dict[str, list[int]] = {}

    def record(name: str, args: tuple) -> None:
        seen.setdefault(name, []).append(args[0].shape[0] if args else 0)

    handles = [module.register_forward_pre_hook(lambda _, args, name=name: record(name, args))
               for name, module in model.named_modules() if isinstance(module, layers)]
    try:
        for rows in (2, 3):
            logits_of(model, batch_of(rows))
            for calls in seen.values():  # a layer's first call on this batch is its witness
                del calls[rows - 1:]
    finally:
        for handle in handles:
            handle.remove()
    off = OffTheRows()
    for name, module in model.named_modules():
        if not isinstance(module, layers):
            continue
        if name not in seen:
            off.unused[name] = ("the forward never calls it as a module (unused, or the model "
                                "reads its weight itself), so an adapter there never trains")
        elif len(seen[name]) < 2 or seen[name][0] * 3 != seen[name][1] * 2:
            off.shared[name] = (f"its input's first dimension is {seen[name][0]} for a batch of "
                                "2 examples, not the examples' rows, which a fused group "
                                "cannot split by trial")
    return off


def per_trial(values: torch.Tensor, k: int, reduce: str = "sum") -> torch.Tensor:
    """Reduce each trial's block of a (K*...) tensor to one number, shape (K,).

    Each block is reduced on its own, so a trial's numbers do not depend on the size of its group
    (a reduction over a (K, n) view may sum in a different order for different K).
    """
    blocks = values.reshape(k, -1).unbind(0)
    return torch.stack([block.mean() if reduce == "mean" else block.sum() for block in blocks])


@dataclass
class StepOutcome:
    """What one training step gives back beside the gradients it left: each trial's loss (K,),
    and any per-step curves the task records beside it (RL: each trial's mean reward)."""

    losses: torch.Tensor
    curves: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (K,)


class Task(ABC):
    """A task kind: its data, training loss and validation metrics (kinds.Kind.metrics)."""

    # whether a loss far above its start means divergence (train.DivergenceWatch); a loss that
    # is not a distance to a target (RL's policy-gradient surrogate, about 0, either sign) is
    # only checked for being finite
    loss_grows_when_diverging = True

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

    def check_model(self, model: nn.Module) -> None:
        """Refuse, as one line, inputs the base model cannot take (before any trial runs);
        tokenized text is cut to fit by the tokenizer, so only other inputs check."""
        return None

    def layers_off_the_rows(self, model: nn.Module, layers: tuple[type, ...]) -> OffTheRows:
        """Adaptable `layers` a fused group cannot give each trial its own adapter on, with why
        (see `layers_off_the_rows`). Token inputs are probed on their first 8 positions (cheap
        for any model size); an unused layer is not refused for them (not yet checked across
        text architectures), only rows that are not the examples' (XLNet's time-major layers).
        Other inputs: none known unless the task probes its model."""
        if not isinstance(self.validation, TokenSplit):
            return OffTheRows()

        def batch_of(rows: int) -> dict[str, torch.Tensor]:
            batch = self.validation.batch(torch.zeros(rows, dtype=torch.long), 1)
            return {name: t[:, :8] if t.ndim > 1 else t for name, t in batch.items()}

        return OffTheRows(shared=layers_off_the_rows(model, batch_of, layers).shared)

    def train_step(self, model: nn.Module, index: torch.Tensor, k: int, train: TrainSpec,
                   active: torch.Tensor, seed: int) -> StepOutcome:
        """Backward of one training step on rows `index` of the training split for K trials
        (those not `active` get no gradient); `seed` is the step's own (dropout.step_seed), for
        a task that draws something per step. Supervised tasks: `accumulate_gradients`."""
        return StepOutcome(accumulate_gradients(model, self, index, k, train, active))

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
        """Summed loss (K,), items scored, correct predictions (K,) for one eval batch (or
        (K, n): counts of n kinds, which `summarize` reads)."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, k: int, batch_size: int,
                 device: torch.device) -> list[dict]:
        """Metrics of each of the K trials on a split: eval_loss and the task's metric."""
        loss_sum = torch.zeros(k, dtype=torch.float64)
        correct: torch.Tensor | None = None  # (K,), or (K, n): hits of n kinds
        count = 0
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            batch = {n: t.to(device) for n, t in split.batch(index, k).items()}
            logits = logits_of(model, batch)
            batch_loss, batch_count, batch_correct = self.eval_terms(logits, batch["labels"], k)
            loss_sum += batch_loss.double().cpu()
            hits = batch_correct.double().cpu()
            correct = hits if correct is None else correct + hits
            count += batch_count
        assert correct is not None, "a split has examples"
        return self.summarize(loss_sum, count, correct)


def accumulate_gradients(model: nn.Module, task: Task, index: torch.Tensor, k: int,
                         train: TrainSpec, active: torch.Tensor) -> torch.Tensor:
    """Backward of one step's batch (rows `index`) in `train.grad_accum` micro-batches; returns
    each trial's mean loss over the batch, shape (K,). Trials not `active` get no gradient.

    Each micro-batch's mean loss is weighted by its share of the batch's scored tokens (examples,
    for classification), so the summed gradient is the whole batch's and padding counts nowhere.
    With one micro-batch the weight is exactly 1: today's numbers, bit for bit.
    """
    device = active.device
    micro = [task.train.batch(part, k)
             for part in index.split(train.batch_size // train.grad_accum)]
    counts = [task.loss_count(batch["labels"]) for batch in micro]
    losses = torch.zeros(k, device=device)
    for batch, count in zip(micro, counts, strict=True):
        batch = {n: t.to(device) for n, t in batch.items()}
        with autocast(train, device):
            logits = logits_of(model, batch)
            part = task.trial_losses(logits, batch["labels"], k) * (count / max(sum(counts), 1))
        torch.where(active, part, torch.zeros_like(part)).sum().backward()
        losses += part.detach()
    return losses
