"""Train one group: K trials over one frozen base, in one batched forward and backward per step.

Trials of a group share the base weights, the starting adapter weights and the data order (they
share a cell and a seed) and differ only in LR. Each trial has its own parameters, optimizer
state, gradient clipping and divergence check, so a trial trains exactly as it would alone, and a
trial that diverges stops without touching the others. K = 1 is a single ordinary run.

Dropout (`train.dropout`, `train.lora_dropout`) is drawn as dropout.py says: each step from
the trial's seed, one trial's mask tiled over the group, so a fused group still reproduces its
trials run one by one and two runs of a study give the same numbers. Evaluation runs in eval
mode (no dropout).

With search.stop_early (`Rungs`) a group is evaluated at each rung after a decay probe that is
thrown away, and may pause there: each trial then leaves a `Checkpoint` (its weights, optimizer
state and course so far) from which a later group, of the trials that go on, resumes. A probe
and a pause change nothing the trial computes: it ends with the numbers of a run straight
through.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import islice

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from lorasweep.config import TrainSpec
from lorasweep.dropout import TiledDropout, set_training, step_seed
from lorasweep.methods import get_method
from lorasweep.methods.base import Attached, NamedParams
from lorasweep.optim import build_optimizer, build_schedule, probe_factor, total_steps
from lorasweep.precision import autocast
from lorasweep.records import Checkpoint, TrialResult
from lorasweep.space import TrialSpec
from lorasweep.tasks import Split, Task
from lorasweep.tasks.base import StepOutcome
from lorasweep.workbench import attach_group, batch_order

DIVERGENCE_WINDOW = 10


@dataclass(frozen=True)
class BestOf:
    """task.select 'best': a trial counts at its best evaluation of `metric`, not its last."""

    metric: str
    maximize: bool

    def better(self, new: dict, old: dict | None) -> bool:
        """Strictly better, so ties keep the earlier evaluation; a non-finite value never is."""
        a = new[self.metric]
        if not math.isfinite(a):
            return False
        if old is None or not math.isfinite(old[self.metric]):
            return True
        b = old[self.metric]
        return a > b if self.maximize else a < b


@dataclass(frozen=True)
class Rungs:
    """search.stop_early as a group trains: at each of `steps`, a decay probe of the matching
    `probes` steps, then an evaluation; with `pause` the group stops at the first rung after
    where it started; with `raw`, each rung also evaluates the weights before the probe."""

    steps: tuple[int, ...]
    probes: tuple[int, ...]
    pause: bool
    raw: bool = False
    after: int = 0  # pause at the first rung past this step (a resumed trial's: past its start)


class DivergenceWatch:
    """Stops a trial whose loss is not finite or (with `factor`) whose recent mean is far above
    its start."""

    def __init__(self, factor: float | None) -> None:
        self.factor = factor
        self.first: float | None = None
        self.recent: deque[float] = deque(maxlen=DIVERGENCE_WINDOW)

    def check(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if self.factor is None:
            return None
        if self.first is None:
            self.first = loss
        self.recent.append(loss)
        mean = sum(self.recent) / len(self.recent)
        if mean > self.factor * self.first:
            return f"mean loss {mean:.4g} over {len(self.recent)} steps > {self.factor:g} x start"
        return None


class TrialCourse:
    """One trial's course through a fused run: its losses, its evaluations, its best evaluation
    so far (with `best_of`) and the weights it had then, and whether (and why) it stopped."""

    def __init__(self, watch: DivergenceWatch, params: NamedParams) -> None:
        self.watch = watch
        self.params = params
        self.curve: list[float] = []
        self.curves: dict[str, list[float]] = {}  # the task's own per-step curves
        self.evals: list[dict] = []
        self.stopped: tuple[int, str] | None = None  # (step, reason)
        self.best: dict | None = None
        self.kept: list[torch.Tensor] | None = None  # the weights at `best`, on the CPU
        self.rungs: list[dict] = []  # search.stop_early: {"step", "probe_steps", metrics...}
        self.seconds = 0.0  # spent in earlier segments (a trial resumed from a Checkpoint)

    def saved(self) -> dict:
        """What a checkpoint keeps of the course (a paused trial has not stopped)."""
        return {"curve": self.curve, "curves": self.curves, "evals": self.evals,
                "best": self.best, "kept": self.kept, "rungs": self.rungs,
                "watch": (self.watch.first, list(self.watch.recent)), "seconds": self.seconds}

    def restore(self, saved: dict) -> None:
        self.curve, self.curves, self.evals = saved["curve"], saved["curves"], saved["evals"]
        self.best, self.kept, self.rungs = saved["best"], saved["kept"], saved["rungs"]
        self.watch.first = saved["watch"][0]
        self.watch.recent.extend(saved["watch"][1])
        self.seconds = saved["seconds"]

    def trained(self, step: int, loss: float, curves: dict[str, float]) -> None:
        """One step's loss (and the task's curves); a trial whose loss runs away stops here."""
        if self.stopped is None:
            self.curve.append(loss)
            for name, value in curves.items():
                self.curves.setdefault(name, []).append(value)
            reason = self.watch.check(loss)
            self.stopped = None if reason is None else (step, reason)

    def evaluated(self, step: int, metrics: dict, best_of: BestOf | None) -> None:
        if self.stopped is not None:
            return
        self.evals.append({"step": step, **metrics})
        if best_of is not None and best_of.better(metrics, self.best):
            self.best = {"step": step, **metrics}
            self.kept = [p.detach().cpu().clone() for _, p in self.params]

    def select(self, step: int, final: dict, best_of: BestOf | None) -> dict:
        """The evaluation the trial reports: its final one, or an earlier best (its weights
        then put back, so its test metrics and weights are of that step too)."""
        if self.stopped is None and self.best is not None and best_of is not None \
                and not best_of.better(final, self.best):
            assert self.kept is not None
            with torch.no_grad():
                for (_, param), value in zip(self.params, self.kept, strict=True):
                    param.copy_(value)
            return self.best
        return {"step": step, **final}

    def result(self, step: int, final: dict, selected: dict, test: dict, keep_weights: bool,
               **common: object) -> TrialResult:
        lost = [name for name, value in final.items() if not math.isfinite(value)]
        if self.stopped is None and lost:
            name = "loss" if lost[0] == "eval_loss" else lost[0]
            self.stopped = (step, f"validation {name} is not finite")
        if self.stopped is not None:
            return TrialResult(status="diverged", steps=self.stopped[0], reason=self.stopped[1],
                               train_loss=self.curve[-1], loss_curve=self.curve,
                               curves=self.curves, eval_curve=self.evals, rungs=self.rungs,
                               **common)
        self.evals.append({"step": step, **final})
        weights = ({name: p.detach().cpu().clone() for name, p in self.params}
                   if keep_weights else None)
        return TrialResult(status="complete", steps=step,
                           metrics={n: v for n, v in selected.items() if n != "step"},
                           test=test, train_loss=_tail_mean(self.curve), weights=weights,
                           selected_step=selected["step"], loss_curve=self.curve,
                           curves=self.curves, eval_curve=self.evals, rungs=self.rungs,
                           **common)

    def paused(self, step: int, optimizer: torch.optim.Optimizer, seconds: float,
               **common: object) -> TrialResult:
        """The trial stopped at a rung, to be resumed from its checkpoint (or stopped there);
        `seconds`: its training time so far, earlier segments included."""
        self.seconds = seconds
        params = [p for _, p in self.params]
        checkpoint = Checkpoint(step=step, params=[p.detach().cpu().clone() for p in params],
                                optimizer=[_state_copy(optimizer.state.get(p), "cpu")
                                           for p in params],
                                course=self.saved())
        return TrialResult(status="paused", steps=step, train_loss=_tail_mean(self.curve),
                           loss_curve=self.curve, curves=self.curves, eval_curve=self.evals,
                           rungs=self.rungs, checkpoint=checkpoint, seconds=seconds, **common)


def train_group(base: nn.Module, task: Task, train: TrainSpec, trials: list[TrialSpec],
                device: torch.device, progress: Callable[[int, int], None] | None = None,
                best_of: BestOf | None = None, rungs: Rungs | None = None,
                resume: list[Checkpoint] | None = None) -> list[TrialResult]:
    """Train `trials` (one cell, one seed, several LRs) together; one result per trial.

    A trial's validation metrics are those of its final evaluation, or with `best_of` those of
    its best evaluation; its test metrics and weights are then of the same step (its weights
    are kept at each new best and put back before the test evaluation). `progress(step, steps)`
    is called after each step. With `rungs` the trials are evaluated at the rungs (and with
    `rungs.pause` stop at the first one past `rungs.after` and past the start, status
    "paused"); `resume` (one checkpoint per trial, all at one step) continues paused trials.
    """
    k = len(trials)
    cell, seed = trials[0].cell, trials[0].seed
    started = time.perf_counter()
    model, attached = attach_group(base, task, train, trials)
    model.to(device)
    if train.gradient_checkpointing:
        checkpoint_blocks(model, k)
    optimizer = build_optimizer(get_method(cell.method), attached, trials, train)
    steps = total_steps(train, len(task.train))
    schedule = build_schedule(optimizer, train, steps)

    def evaluate(split: Split) -> list[dict]:
        model.eval()
        with autocast(train, device):
            return task.evaluate(model, split, k, train.eval_batch_size, device)

    drops = train.dropout == "model" or train.lora_dropout > 0

    def train_step(index: torch.Tensor, step: int, active: list[bool]) -> StepOutcome:
        """One step of the group's trials on the batch `index` (the `active` ones get a
        gradient), with the dropout masks of `step`."""
        set_training(model, train)
        torch.manual_seed(step_seed(seed, step))
        # the mode wraps every torch call: entered only when some dropout can fire
        with TiledDropout(k) if drops else contextlib.nullcontext():
            return task.train_step(model, index, k, train, torch.tensor(active, device=device),
                                   step_seed(seed, step))

    factor = train.divergence_factor if task.loss_grows_when_diverging else None
    courses = [TrialCourse(DivergenceWatch(factor), params)
               for params in attached.trial_params]
    start = 0
    if resume is not None:
        start = resume[0].step
        _resume(courses, optimizer, schedule, resume, device)
    step = start
    order = batch_order(len(task.train), train.batch_size, steps, seed)
    for step, index in enumerate(islice(order, start, None), start + 1):
        outcome = train_step(index, step, [c.stopped is None for c in courses])
        curves = {name: values.detach().cpu().tolist() for name, values in outcome.curves.items()}
        for i, (course, loss) in enumerate(zip(courses, outcome.losses.detach().cpu().tolist(),
                                               strict=True)):
            course.trained(step, loss, {name: values[i] for name, values in curves.items()})
        for course in courses:
            clip_or_drop([p for _, p in course.params], train.grad_clip,
                         course.stopped is not None)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, steps)
        if all(c.stopped is not None for c in courses):
            break
        if train.eval_every and step % train.eval_every == 0 and step < steps:
            for course, metrics in zip(courses, evaluate(task.validation), strict=True):
                course.evaluated(step, metrics, best_of)
        if rungs is not None and step in rungs.steps:
            raw = evaluate(task.validation) if rungs.raw else [{} for _ in courses]
            length = rungs.probes[rungs.steps.index(step)]
            probed = _probe(courses, optimizer, train_step, evaluate, task, train, seed, step,
                            length)
            for course, before, after in zip(courses, raw, probed, strict=True):
                if course.stopped is None:
                    course.rungs.append({"step": step, "probe_steps": length, **after,
                                         **{f"raw_{n}": v for n, v in before.items()}})
            if rungs.pause and step > rungs.after:
                seconds = (time.perf_counter() - started) / k
                return [course.result(step, {}, {}, {}, False, **_common(course, seconds,
                                                                         attached))
                        if course.stopped is not None else
                        course.paused(step, optimizer, **_common(course, seconds, attached))
                        for course in courses]

    final = evaluate(task.validation)
    selected = [c.select(step, metrics, best_of) for c, metrics in zip(courses, final,
                                                                       strict=True)]
    test = evaluate(task.test) if task.test is not None else [{} for _ in trials]
    seconds = (time.perf_counter() - started) / k
    return [course.result(step, final[i], selected[i], test[i], cell.is_adapter,
                          **_common(course, seconds, attached))
            for i, course in enumerate(courses)]


def _common(course: TrialCourse, seconds: float, attached: Attached) -> dict:
    """What every result of the group records beside the trial's own course (`seconds`: this
    segment's share of the group's time; earlier segments' are added)."""
    return {"seconds": course.seconds + seconds, "trainable_params": attached.trainable_count,
            "effective_scale": attached.effective_scale}


def _probe(courses: list[TrialCourse], optimizer: torch.optim.Optimizer,
           train_step: Callable[[torch.Tensor, int, list[bool]], StepOutcome],
           evaluate: Callable[[Split], list[dict]], task: Task, train: TrainSpec, seed: int,
           rung: int, length: int) -> list[dict]:
    """Each trial's validation metrics after a decay probe at `rung`: `length` more steps on the
    batches the run would take next, the LR falling linearly from its scheduled value to zero;
    then the weights, the optimizer state and the LRs are put back as they were. A trial whose
    loss stops being finite in the probe scores as diverged (non-finite metrics)."""
    params = [p for course in courses for _, p in course.params]
    kept = [p.detach().clone() for p in params]
    states = [_state_copy(optimizer.state.get(p)) for p in params]
    lrs = [group["lr"] for group in optimizer.param_groups]
    active = [course.stopped is None for course in courses]
    lost = [False] * len(courses)
    order = batch_order(len(task.train), train.batch_size, rung + length, seed)
    for j, index in enumerate(islice(order, rung, None), 1):
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr * probe_factor(j, length)
        losses = train_step(index, rung + j, active).losses.detach().cpu().tolist()
        for i, loss in enumerate(losses):
            if active[i] and not math.isfinite(loss):
                active[i], lost[i] = False, True
        for course, on in zip(courses, active, strict=True):
            clip_or_drop([p for _, p in course.params], train.grad_clip, not on)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    metrics = evaluate(task.validation)
    with torch.no_grad():
        for param, value, state in zip(params, kept, states, strict=True):
            param.copy_(value)
            if state is None:
                optimizer.state.pop(param, None)
            else:
                optimizer.state[param] = state
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    return [{name: math.nan for name in values} if gone else values
            for values, gone in zip(metrics, lost, strict=True)]


def _resume(courses: list[TrialCourse], optimizer: torch.optim.Optimizer,
            schedule: torch.optim.lr_scheduler.LRScheduler, checkpoints: list[Checkpoint],
            device: torch.device) -> None:
    """Put each trial's checkpoint into the freshly attached group and move the schedule to the
    checkpoints' step."""
    assert len({c.step for c in checkpoints}) == 1, "a group resumes from one step"
    with torch.no_grad():
        for course, checkpoint in zip(courses, checkpoints, strict=True):
            params = [p for _, p in course.params]
            for param, value, state in zip(params, checkpoint.params, checkpoint.optimizer,
                                           strict=True):
                param.copy_(value)
                if state is not None:
                    optimizer.state[param] = _state_copy(state, device)
            course.restore(checkpoint.course)
    with warnings.catch_warnings():  # stepping a schedule before its optimizer is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(checkpoints[0].step):
            schedule.step()


def _state_copy(state: dict | None, device: torch.device | str | None = None) -> dict | None:
    """A copy of one parameter's optimizer state (its tensors cloned, or moved to `device`)."""
    if state is None:
        return None
    return {name: (value.detach().to(device, copy=True) if device is not None
                   else value.detach().clone()) if isinstance(value, torch.Tensor) else value
            for name, value in state.items()}


def checkpoint_blocks(model: nn.Module, k: int = 1) -> None:
    """Recompute each transformer block in the backward (torch's non-reentrant checkpoint, through
    transformers), keeping only the blocks' inputs: the same numbers in less memory.

    The recomputation runs under dropout.TiledDropout for the group's `k` trials (torch runs it
    inside the autograd engine, outside the step's own mode) and from the generator state torch
    saved at the forward, so it redraws the forward's masks. transformers checkpoints a block
    only while the block is in training mode: over a model in eval mode (dropout off) only the
    blocks themselves are flagged, not their dropout layers (dropout.set_training flags them
    again at each step).
    """
    model.activation_checkpointing_enable({"use_reentrant": False,
                                            "context_fn": partial(recompute_contexts, k)})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def recompute_contexts(k: int) -> tuple[contextlib.AbstractContextManager, TiledDropout]:
    """torch checkpoint's context_fn: the forward as it is, the recomputation with tiled masks."""
    return contextlib.nullcontext(), TiledDropout(k)


def clip_or_drop(params: list[nn.Parameter], max_norm: float | None, stopped: bool) -> None:
    """Clip a trial's gradient on its own norm; a stopped trial takes no more steps."""
    if stopped:
        for param in params:
            param.grad = None
    elif max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def _tail_mean(values: list[float]) -> float:
    tail = values[-DIVERGENCE_WINDOW:]
    return sum(tail) / len(tail)
