"""The exact Adam invariance (eps = 0) as a test of the scale and LR plumbing.

Mapping (alpha, init scale of A, LR_A, LR_B) to (alpha/(pq), p*init_A, p*LR_A, q*LR_B) leaves the
trajectory of s*B*A, and so of the model, unchanged. LR_A and LR_B are set apart through LoRA+'s
ratio; the decoder has no trained head, so every trainable weight is an adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.methods import get_method
from lorasweep.models import load_model, load_tokenizer
from lorasweep.optim import build_optimizer
from lorasweep.space import Cell, TrialSpec

# every test here compares two computations of the same numbers (tests/test_threads.py)
pytestmark = pytest.mark.numerics

STEPS = 6


def trajectory(base, alpha: float, a_scale: float, b_scale: float, lr_a: float,
               lr_b: float) -> list[torch.Tensor]:
    model = copy.deepcopy(base)
    cell = Cell(method="loraplus", rank=4, lora_alpha=f"{alpha!r}", init="kaiming",
                target_modules="all-linear", loraplus_ratio=lr_b / lr_a)
    attached = get_method("loraplus").attach(model, cell, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, param in attached.trial_params[0]:
            if name.endswith("lora_A"):
                param.mul_(a_scale)
            else:  # B starts non-zero: with eps = 0 a zero gradient would make Adam divide 0/0
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
                param.mul_(b_scale)
    train = TrainSpec(steps=STEPS, adam_eps=0.0, weight_decay=0.0, grad_clip=None)
    optimizer = build_optimizer(get_method("loraplus"), attached,
                                [TrialSpec(grid_id=0, cell=cell, lr=lr_a, seed=0)], train)
    outputs = []
    ids = torch.randint(1000, 5000, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(STEPS):
        logits = model(input_ids=ids).logits
        outputs.append(logits.detach())
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return outputs


@pytest.mark.parametrize(("p", "q"), [(2.0, 0.25), (3.0, 0.5), (0.1, 7.0)])
def test_adam_invariance(p, q):
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    base = load_model(ModelSpec(source="tiny:llama"), "causal_lm", None, tokenizer)
    alpha, lr_a, lr_b = 8.0, 1e-2, 4e-2
    before = trajectory(base, alpha, 1.0, 1.0, lr_a, lr_b)
    after = trajectory(base, alpha / (p * q), p, q, p * lr_a, q * lr_b)
    for step, (x, y) in enumerate(zip(before, after, strict=True)):
        assert float((x - y).norm() / x.norm()) < 1e-5, step
    # and the trajectory really moved, so the test can fail
    assert float((before[-1] - before[0]).norm() / before[0].norm()) > 1e-3


def test_mapping_without_matching_lr_changes_the_trajectory():
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    base = load_model(ModelSpec(source="tiny:llama"), "causal_lm", None, tokenizer)
    before = trajectory(base, 8.0, 1.0, 1.0, 1e-2, 4e-2)
    wrong = trajectory(base, 8.0 / 0.5, 2.0, 0.25, 1e-2, 4e-2)  # scales mapped, LRs not
    assert float((before[-1] - wrong[-1]).norm() / before[-1].norm()) > 1e-3
