"""What a study's trials start from: the base model and data, loaded once per process, and a
trial's trainable weights drawn from its cell and seed.

Training (`train.py`), `lorasweep curvature` and `lorasweep export` all attach a trial here, so
"the weights a trial starts from" means one thing everywhere. Depends on models, methods and
tasks only: no store, no trainer, no worker loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lorasweep.config import TARGETS_AXIS, Study, TrainSpec
from lorasweep.dropout import check_norms
from lorasweep.errors import StudyError
from lorasweep.kinds import DENOISER, Kind, kind_of
from lorasweep.methods import Attached, get_method
from lorasweep.methods.peft_passthrough import names_own_targets, needs_data
from lorasweep.methods.targets import (
    ADAPTABLE,
    HEAD_NAMES,
    adapter_width,
    head_module_names,
    layer_shape,
    resolve_targets,
)
from lorasweep.models import load_model, load_preprocessor, max_positions
from lorasweep.precision import base_dtype, check_device_support
from lorasweep.recipe import Training, resolve_training
from lorasweep.space import Cell, TrialSpec, expand_trials, recipes_of, target_text
from lorasweep.tasks import Task, build_task, num_labels
from lorasweep.tasks.base import OffTheRows

CALIBRATION_BATCHES = 8


@dataclass
class Workbench:
    """What every group of a study shares, loaded once per process."""

    task: Task
    base: nn.Module
    tasks: dict[int, Task] = field(default_factory=dict)  # the task at each swept seq_len
    widths: dict[str, int] | None = None  # adapter width per target set, for match_params
    # the layers each target set the study's adapter cells name resolves to in this process
    targets: dict[str, list[str]] = field(default_factory=dict)
    # target sets whose trials train one at a time, with why (check_fusable)
    alone: dict[str, str] = field(default_factory=dict)

    def fusable(self, cell: Cell) -> bool:
        """Whether K trials of the cell may train in one group."""
        return cell.fusable and cell.target_modules not in self.alone

    def task_for(self, training: Training) -> Task:
        """What a trial trains on: the task at its sequence length, cut to its subset."""
        task = self.tasks.get(training.train.seq_len, self.task)
        return task.with_train_examples(training.train_examples)


def load_workbench(study: Study, device: str = "cpu") -> Workbench:
    """The study's data and base model (stored in the dtype it trains in on `device`)."""
    check_device_support(study, device)
    trainings = [resolve_training(study.train, text) for text in recipes_of(study)]
    kind = kind_of(study.task.kind)
    if kind.model != DENOISER:  # a diffusion pipeline has no text model config
        _check_seq_len(study, {r.train.seq_len for r in trainings} | {study.train.seq_len})
    preprocessor = load_preprocessor(study.model, study.task.kind)
    task = build_task(study, preprocessor)
    tasks = {seq_len: build_task(study, preprocessor, seq_len)
             for seq_len in {r.train.seq_len for r in trainings} - {study.train.seq_len}}
    for training in trainings:
        if training.train_examples is not None and training.train_examples > len(task.train):
            raise StudyError(f"search.recipe.train_examples: {training.train_examples} is more "
                             f"than the {len(task.train)} training examples (after validation)")
    base = load_model(study.model, study.task.kind, num_labels(task), preprocessor,
                      base_dtype(study.model, study.train, device))
    check_base(base, kind, study.model.source, study.train)
    task.check_model(base)
    widths = None
    if study.search.match_params:
        widths = {target_text(t): adapter_width(base, target_text(t))
                  for t in study.search.recipe[TARGETS_AXIS]}
    # the ranks the study names are checked against their layers; match_params derives other
    # target sets' ranks from them, larger ones included, and those are the study's design
    written = (None if widths is None else target_text(study.search.recipe[TARGETS_AXIS][0]))
    targets: dict[str, list[str]] = {}
    off = task.layers_off_the_rows(base, ADAPTABLE)
    alone: dict[str, str] = {}
    for cell in {t.cell for t in expand_trials(study, widths)}:
        if cell.is_adapter and not names_own_targets(cell):
            assert cell.target_modules is not None
            layers = targets.setdefault(cell.target_modules,
                                        resolve_targets(base, cell.target_modules))
            reason = check_fusable(layers, off, cell.target_modules)
            if reason is not None:
                alone[cell.target_modules] = reason
            if written in (None, cell.target_modules):
                _check_rank(base, layers, cell.rank)
        if cell.method == "peft" and not needs_data(cell):
            # PEFT checks its configuration against the model only when it builds it (inits that
            # need data are built at training time: a dry run would cost a calibration pass)
            try:
                get_method("peft").attach(copy.deepcopy(base), cell, 1, torch.Generator())
            except (TypeError, ValueError, KeyError) as exc:
                raise StudyError(f"search.methods: peft entry '{cell.label}' cannot be built: "
                                 f"{str(exc).splitlines()[0]}") from None
    return Workbench(task=task, base=base, tasks=tasks, widths=widths,
                     targets=dict(sorted(targets.items())), alone=alone)


def check_base(base: nn.Module, kind: Kind, source: str, train: TrainSpec) -> None:
    """Refuse, in one line, a base model lorasweep would train other than as it would alone or
    as PEFT does: a classifier whose head it cannot find (the head would stay frozen at its
    random init under LoRA), or a norm that would mix a fused group's trials."""
    if kind.labels and not head_module_names(base):
        raise StudyError(f"model.source: '{source}' has no task head named "
                         f"{' or '.join(HEAD_NAMES)}, which every method trains fully "
                         "(a timm model through transformers keeps its head inside timm_model)")
    check_norms(base, train)


def check_fusable(layers: list[str], off: OffTheRows, targets: str) -> str | None:
    """Refuse an adapter that would never train (tasks.layers_off_the_rows); where a layer's
    input does not hold the examples' rows, the line saying why the cell's trials train one at
    a time (exact, as PEFT trains one), else None."""
    for name in layers:
        if name in off.unused:
            raise StudyError(f"search.target_modules: '{targets}' reaches layer {name}: "
                             f"{off.unused[name]}; name the target modules without it")
    shared = [name for name in layers if name in off.shared]
    return (None if not shared else
            f"target modules '{targets}': layer {shared[0]}: {off.shared[shared[0]]}; its "
            "trials train one at a time")


def _check_seq_len(study: Study, lengths: set[int]) -> None:
    """Sequences longer than the model's positions fail late, after padding every example to
    that length has exhausted memory; refuse them before any data is tokenized."""
    limit = max_positions(study.model)
    if limit is not None and max(lengths) > limit:
        raise StudyError(f"train.seq_len {max(lengths)}: above the {limit} positions of model "
                         f"'{study.model.source}'; allowed: 8 to {limit}")


def _check_rank(base: nn.Module, names: list[str], rank: int | None) -> None:
    """A rank above a target layer's narrower side adds nothing a smaller one lacks."""
    if rank is None:
        return
    shapes = {n: layer_shape(base.get_submodule(n)) for n in names}  # (out, in), 4-bit too
    name = min(names, key=lambda n: min(shapes[n]))
    width = min(shapes[name])
    if rank > width:
        raise StudyError(f"search.ranks: rank {rank} is above the width of layer {name} "
                         f"({' x '.join(map(str, shapes[name]))}); allowed: "
                         f"at most {width} for these target modules")


def batch_order(train_size: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Example indices of each step: a fresh seeded permutation every epoch."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, train_size // batch_size)
    order = torch.randperm(train_size, generator=generator)
    position = 0
    for _ in range(steps):
        if position == per_epoch:
            order, position = torch.randperm(train_size, generator=generator), 0
        yield order[position * batch_size:(position + 1) * batch_size]
        position += 1


def attach_trials(base: nn.Module, trials: list[TrialSpec],
                  calibration: Callable[[], list[dict[str, torch.Tensor]]] | None = None,
                  lora_dropout: float = 0.0) -> tuple[nn.Module, Attached]:
    """A fresh copy of the base carrying the trainable weights of `trials` (one cell, one seed),
    drawn from the seed exactly as training draws them (`calibration`: batches for inits that
    look at data; `lora_dropout`: the adapters' input dropout while training)."""
    cell, seed = trials[0].cell, trials[0].seed
    assert all(t.group_key == trials[0].group_key for t in trials), "a group shares cell and seed"
    torch.manual_seed(seed)  # for what an init draws from the global generator (randomized SVD)
    model = copy.deepcopy(base)
    attached = get_method(cell.method).attach(model, cell, len(trials),
                                              torch.Generator().manual_seed(seed), calibration,
                                              lora_dropout)
    # in eval mode throughout, the new adapter layers too (a new module starts in train mode):
    # no dropout until training asks for it (dropout.set_training), so curvature measures none
    return model.eval(), attached


def attach_group(base: nn.Module, task: Task, train: TrainSpec, trials: list[TrialSpec]
                 ) -> tuple[nn.Module, Attached]:
    """`attach_trials` with the group's first training batches as calibration data.

    Training and `lorasweep curvature` both start here, so "at initialization" means the very
    weights a trial starts from.
    """
    seed = trials[0].seed

    def calibration() -> list[dict[str, torch.Tensor]]:
        """The trial's first training batches, for inits that look at data (on the CPU)."""
        order = batch_order(len(task.train), train.batch_size, CALIBRATION_BATCHES, seed)
        return [task.train.batch(index, 1) for index in order]

    return attach_trials(base, trials, calibration, train.lora_dropout)
