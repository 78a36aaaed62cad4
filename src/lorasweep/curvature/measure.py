"""Measure a study's cells: the loss Hessian's extreme eigenvalues per block, at init and after
warm-up, one row per block for curvature.csv.

A cell starts from the very weights its trials start from (workbench.attach_group with the study's
first seed). Blocks are each adapted module's parameters together (its (A, B) pair, with DoRA's
magnitude; a full fine-tuning module's weight and bias), and all trainable parameters jointly
(the task head included). The data are the trial's first training batches, the same at every
stage.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lorasweep.config import Study, TrainSpec
from lorasweep.curvature.hvp import LossHessian, adam_scale, block_size, eager_attention
from lorasweep.curvature.lanczos import lanczos
from lorasweep.errors import StudyError
from lorasweep.methods import Attached, get_method
from lorasweep.methods.base import NamedParams
from lorasweep.methods.targets import resolve_targets
from lorasweep.optim import build_optimizer, build_schedule, total_steps
from lorasweep.recipe import resolve_training
from lorasweep.records import CurvatureRecord
from lorasweep.space import Cell, TrialSpec, cells_of, grid_step, target_text
from lorasweep.tasks import Task
from lorasweep.tasks.base import accumulate_gradients
from lorasweep.train import clip_or_drop
from lorasweep.workbench import Workbench, attach_group, batch_order

BLOCK_KINDS = ("modules", "joint")
JOINT = "joint"


@dataclass(frozen=True)
class Settings:
    """What to measure and how precisely (the CLI's options)."""

    batches: int = 4
    warmup_steps: int = 0
    warmup_lr: float | None = None  # None: the cell's measured optimum, else its grid's middle
    top_k: int = 1
    tol: float = 1e-4
    max_iter: int = 30
    blocks: tuple[str, ...] = BLOCK_KINDS
    adam: bool = False
    seed: int = 0  # Lanczos start vectors


def select_cells(study: Study, methods: list[str] | None, rank: int | None
                 ) -> list[tuple[Cell, list[float]]]:
    """One cell per method of the study (the first of its inits and lora_alpha values) at one
    rank (the study's first unless `rank`), optionally only the `methods` named."""
    ranks = study.search.ranks
    if rank is not None and rank not in ranks:
        raise StudyError(f"--rank {rank}: not in the study's search.ranks "
                         f"({', '.join(map(str, ranks))})")
    rank = ranks[0] if rank is None else rank
    every = cells_of(study)
    chosen: dict[str, tuple[Cell, list[float]]] = {}
    for cell, lrs in every:
        if cell.rank in (None, rank) and cell.label not in chosen:
            chosen[cell.label] = (cell, lrs)
    for name in methods or []:
        if name not in chosen:
            names = dict.fromkeys(cell.label for cell, _ in every)
            raise StudyError(f"--method {name}: not in the study at rank {rank}; its methods: "
                             f"{', '.join(names)}")
    return [found for label, found in chosen.items() if not methods or label in methods]


def module_type(name: str) -> str:
    """A module's name without its layer: `bert.encoder.layer.3.attention.self.query` ->
    `attention.self.query`, so the same projection in every layer shares a type."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbered[0] + 1:]) if numbered else name


def blocks_of(base: nn.Module, study: Study, cell: Cell, params: NamedParams,
              kinds: tuple[str, ...]) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, parameters) of each block to measure: adapted modules in model order, then joint."""
    blocks = []
    if "modules" in kinds:
        text = cell.target_modules or target_text(study.search.target_modules)
        for module in resolve_targets(base, text):
            members = [p for n, p in params if n.startswith(module + ".")]
            if members:
                blocks.append((module, members))
    if JOINT in kinds:
        blocks.append((JOINT, [p for _, p in params]))
    return blocks


def grid_middle(lrs: list[float]) -> float:
    return float(math.exp(statistics.mean(math.log(lr) for lr in lrs)))


def measure_cell(bench: Workbench, study: Study, cell: Cell, lrs: list[float], settings: Settings,
                 lr_star: float | None = None, log: Callable[[str], None] = print
                 ) -> list[CurvatureRecord]:
    """One cell's curvature records: every block at init, and after warm-up when asked."""
    seed = study.search.seeds[0]
    warmup_lr = settings.warmup_lr or lr_star or grid_middle(lrs)
    trial = TrialSpec(grid_id=-1, cell=cell, lr=warmup_lr, seed=seed)
    training = resolve_training(study.train, cell.recipe)  # as the runner trains the cell
    task = bench.task_for(training)
    model, attached = attach_group(bench.base, task, training.train, [trial])
    params = attached.trial_params[0]
    blocks = blocks_of(bench.base, study, cell, params, settings.blocks)
    batches = [task.train.batch(index, 1) for index in
               batch_order(len(task.train), training.train.batch_size, settings.batches, seed)]
    def stage(name: str, steps: int, optimizer: torch.optim.Optimizer | None
              ) -> list[CurvatureRecord]:
        """Every block, plain and (given AdamW) preconditioned, over one gradient graph."""
        records: list[CurvatureRecord] = []
        with eager_attention(model):
            hessian = LossHessian(model, task, batches, [p for _, p in params])
            loss = float(hessian.loss.detach())
            if not math.isfinite(loss):
                raise StudyError(f"{cell.label}: the loss is {loss} after {steps} warm-up "
                                 f"steps at lr {warmup_lr:g}; give a lower --warmup-lr")
            for adam in [None, optimizer] if optimizer is not None else [None]:
                started = time.perf_counter()
                done = [CurvatureRecord(
                    cell=cell.recorded, seed=seed, stage=name, steps=steps,
                    warmup_lr=warmup_lr if steps else None, preconditioned=adam is not None,
                    items=hessian.items, lr_grid_step=grid_step(lrs),
                    **_measure_block(hessian, block_name, block, settings, adam))
                    for block_name, block in tqdm(blocks, desc=f"{cell.label} {name}",
                                                  leave=False, disable=None)]
                shown = next((r for r in done if r.block == JOINT), done[-1])
                log(f"  {cell.label} {name}{' (Adam-preconditioned)' if adam else ''}: "
                    f"{len(done)} blocks, {shown.block} lambda_max "
                    f"{shown.lambda_max:.4g} in {time.perf_counter() - started:.0f} s")
                records += done
        return records

    records = stage("init", 0, None)
    if settings.warmup_steps:
        optimizer = warm_up(model, attached, trial, training.train, task, settings.warmup_steps)
        records += stage("warmup", settings.warmup_steps, optimizer if settings.adam else None)
    return records


def _measure_block(hessian: LossHessian, name: str, block: list[nn.Parameter],
                   settings: Settings, optimizer: torch.optim.Optimizer | None) -> dict:
    """A block's fields of its CurvatureRecord."""
    scale = adam_scale(optimizer, block) if optimizer is not None else None
    spectrum = lanczos(hessian.operator(block, scale), block_size(block), settings.top_k,
                       settings.tol, settings.max_iter, settings.seed)
    return {"block": name, "module_type": "" if name == JOINT else module_type(name),
            "params": block_size(block), "lambda_max": spectrum.largest,
            "lambda_top": " ".join(f"{v:.9g}" for v in spectrum.top),
            "lambda_min": spectrum.smallest, "products": spectrum.products,
            "converged": spectrum.converged, "error": spectrum.error}


def warm_up(model: nn.Module, attached: Attached, trial: TrialSpec, train: TrainSpec,
            task: Task, steps: int) -> torch.optim.Optimizer:
    """The trial's own first `steps` training steps (its optimizer, schedule, micro-batches,
    precision, clipping and data order, through the trainer's own step); returns the optimizer,
    whose second moment preconditions Adam's sharpness."""
    optimizer = build_optimizer(get_method(trial.cell.method), attached, [trial], train)
    schedule = build_schedule(optimizer, train, total_steps(train, len(task.train)))
    params = [p for _, p in attached.trial_params[0]]
    active = torch.ones(1, dtype=torch.bool, device=params[0].device)
    for index in batch_order(len(task.train), train.batch_size, steps, trial.seed):
        accumulate_gradients(model, task, index, 1, train, active)
        clip_or_drop(params, train.grad_clip, stopped=False)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer

