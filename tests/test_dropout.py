"""dropout.py's draws: one trial's mask tiled over K trials, plain torch dropout at K = 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorasweep.config import TrainSpec
from lorasweep.dropout import TiledDropout, step_seed
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.base import accumulate_gradients
from lorasweep.workbench import attach_group

from .test_methods import tiny, toy_task

# every test here compares two computations of the same numbers (tests/test_threads.py)
pytestmark = pytest.mark.numerics


def test_one_trial_is_torch_dropout_bit_for_bit_and_a_group_repeats_its_mask():
    x = torch.randn(6, 5, 7)
    torch.manual_seed(3)
    plain = F.dropout(x, 0.3, training=True)
    torch.manual_seed(3)
    with TiledDropout(1):
        assert torch.equal(F.dropout(x, 0.3, training=True), plain)
        assert torch.equal(torch.nn.Dropout(0.3).eval()(x), x)
    torch.manual_seed(3)
    with TiledDropout(3):
        tiled = torch.nn.Dropout(0.3)(x.repeat(3, 1, 1))
    assert all(torch.equal(part, plain) for part in tiled.chunk(3))


def test_channel_dropouts_are_refused_while_training():
    with TiledDropout(2), pytest.raises(RuntimeError, match="dropout2d is not supported"):
        F.dropout2d(torch.ones(4, 3, 2, 2), 0.5, training=True)
    with TiledDropout(2):  # in eval mode they change nothing, and pass
        assert torch.equal(F.dropout2d(torch.ones(4, 3, 2, 2), 0.5, training=False),
                           torch.ones(4, 3, 2, 2))


def test_step_seeds_differ_by_step_and_seed_and_from_the_seed_itself():
    seeds = {step_seed(seed, step) for seed in range(3) for step in range(1, 4)}
    assert len(seeds) == 9 and not seeds & set(range(3))


def test_a_model_outside_training_mode_draws_nothing():
    """What `lorasweep curvature` runs (the model as attached, in eval mode, no TiledDropout):
    no dropout at all, lora_dropout included, whatever the global generator holds."""
    task = toy_task()
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="random_ab",
                target_modules="all-linear")
    train = TrainSpec(steps=1, batch_size=8, lora_dropout=0.5)
    model, _ = attach_group(tiny("tiny:bert"), task, train, [TrialSpec(grid_id=0, cell=cell,
                                                                        lr=1e-3, seed=0)])
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(accumulate_gradients(model, task, torch.arange(8), 1, train,
                                           torch.ones(1, dtype=torch.bool)))
    assert torch.equal(losses[0], losses[1])


def test_a_per_example_draw_is_one_trials_draw_tiled_and_others_are_left_alone():
    """Drop path draws torch.rand((rows, 1, ..., 1)): in a group of K, trial 0's rows are drawn
    and tiled (the draw alone would make); any other draw is the plain one."""
    torch.manual_seed(3)
    alone = torch.rand((2, 1, 1))
    other = torch.rand(4, 3)
    torch.manual_seed(3)
    with TiledDropout(2):
        fused = torch.rand((4, 1, 1))
        same = torch.rand(4, 3)
    assert torch.equal(fused, alone.repeat(2, 1, 1))
    assert torch.equal(same, other)
