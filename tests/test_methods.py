"""Inits, scales, target modules and heads of the native methods, and fused-group equality."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lorasweep.config import METHOD_NAMES, ModelSpec, TrainSpec
from lorasweep.errors import StudyError
from lorasweep.methods import METHODS, get_method
from lorasweep.methods.lora import initial_factors
from lorasweep.methods.targets import resolve_targets
from lorasweep.models import load_model, load_tokenizer
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.base import Split
from lorasweep.tasks.classification import ClassificationTask
from lorasweep.train import train_group


def tiny(source: str, kind: str = "classification"):
    tokenizer = load_tokenizer(ModelSpec(source=source))
    return load_model(ModelSpec(source=source), kind, 3 if kind == "classification" else None,
                      tokenizer)


def test_registry_matches_the_schema():
    assert set(METHODS) == set(METHOD_NAMES)


@pytest.mark.parametrize(("init", "a_std", "b_std"), [
    ("kaiming", 1 / math.sqrt(3 * 512), 0.0),   # U(+-1/sqrt(n)) has std 1/sqrt(3n)
    ("gaussian", 1 / 16, 0.0),                  # N(0, 1/r^2)
    ("mua_a", 1 / math.sqrt(512), 0.0),         # N(0, 1/n)
    ("mua_b", 0.0, 1 / math.sqrt(16)),          # A = 0, B ~ N(0, 1/r)
])
def test_init_distributions(init, a_std, b_std):
    a, b = initial_factors(init, 16, 512, 1024, torch.Generator().manual_seed(0))
    assert a.shape == (16, 512) and b.shape == (1024, 16)
    assert float(a.std()) == pytest.approx(a_std, rel=0.05, abs=1e-12)
    assert float(b.std()) == pytest.approx(b_std, rel=0.05, abs=1e-12)
    if init == "kaiming":
        assert float(a.abs().max()) <= 1 / math.sqrt(512)


@pytest.mark.parametrize(("method", "alpha", "rank", "scale"), [
    ("lora", "16", 4, 4.0), ("lora", "2r", 8, 2.0), ("rslora", "16", 4, 8.0),
    ("rslora", "1r", 16, 4.0), ("loraplus", "8", 4, 2.0)])
def test_effective_scale(method, alpha, rank, scale):
    cell = Cell(method=method, rank=rank, lora_alpha=alpha, init="kaiming",
                target_modules="all-linear", loraplus_ratio=16.0)
    attached = get_method(method).attach(tiny("tiny:bert"), cell, 1, torch.Generator())
    assert attached.effective_scale == pytest.approx(scale)


@pytest.mark.parametrize(("source", "preset", "expected"), [
    ("tiny:bert", "attention", {"query", "key", "value", "dense"}),
    ("tiny:bert", "mlp", {"dense"}),
    ("tiny:llama", "attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("tiny:llama", "mlp", {"gate_proj", "up_proj", "down_proj"}),
])
def test_target_presets(source, preset, expected):
    model = tiny(source)
    names = resolve_targets(model, preset)
    assert {n.split(".")[-1] for n in names} == expected
    everything = resolve_targets(model, "all-linear")
    assert set(names) < set(everything)
    assert not any(n.startswith(("classifier", "score", "lm_head")) or "pooler" in n
                   for n in everything)
    if source == "tiny:bert":
        assert all(("attention" in n) == (preset == "attention") for n in names)


def test_unknown_target_names_the_layers():
    with pytest.raises(StudyError, match=r"search\.target_modules.*query"):
        resolve_targets(tiny("tiny:bert"), "q_proj")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_head_is_trained_and_seeded_under_every_method(method):
    cell = Cell(method=method, rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear") if method != "full" else Cell(method="full")
    heads = []
    for _ in range(2):
        model = tiny("tiny:bert")
        attached = get_method(method).attach(model, cell, 1, torch.Generator().manual_seed(3))
        named = dict(attached.trial_params[0])
        assert "classifier.weight" in named and named["classifier.weight"].requires_grad
        heads.append(named["classifier.weight"].detach().clone())
    assert torch.equal(heads[0], heads[1])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert bool(frozen) == (method != "full")


def toy_task(n: int = 48) -> ClassificationTask:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (n, 10), generator=generator)
    labels = ids[:, 0] % 3
    split = Split(ids, torch.ones_like(ids), labels)
    return ClassificationTask(split, split, None, ["a", "b", "c"])


@pytest.mark.parametrize("method", ["lora", "rslora", "loraplus"])
def test_fused_group_equals_trials_run_one_by_one(method):
    base = tiny("tiny:bert")
    task = toy_task()
    recipe = TrainSpec(steps=8, batch_size=8, grad_clip=1.0, warmup_ratio=0.25)
    cell = Cell(method=method, rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear", loraplus_ratio=4.0 if method == "loraplus" else None)
    trials = [TrialSpec(grid_id=i, cell=cell, lr=lr, seed=0)
              for i, lr in enumerate([1e-4, 1e-3, 1e-2, 3e-2])]
    fused = train_group(base, task, recipe, trials, torch.device("cpu"))
    for trial, together in zip(trials, fused, strict=True):
        (alone,) = train_group(copy.deepcopy(base), task, recipe, [trial], torch.device("cpu"))
        curve_a, curve_b = torch.tensor(together.loss_curve), torch.tensor(alone.loss_curve)
        assert torch.allclose(curve_a, curve_b, rtol=1e-5, atol=0), (trial.lr, curve_a, curve_b)
        assert together.metrics["accuracy"] == alone.metrics["accuracy"]


def test_diverging_trial_leaves_its_group_untouched():
    base = tiny("tiny:bert")
    task = toy_task()
    recipe = TrainSpec(steps=8, batch_size=8, grad_clip=None, warmup_ratio=0.0)
    cell = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming",
                target_modules="all-linear")
    calm = TrialSpec(grid_id=0, cell=cell, lr=1e-3, seed=0)
    wild = TrialSpec(grid_id=1, cell=cell, lr=1e4, seed=0)
    together = train_group(base, task, recipe, [calm, wild], torch.device("cpu"))
    (alone,) = train_group(base, task, recipe, [calm], torch.device("cpu"))
    assert together[1].status == "diverged" and together[1].steps < 8
    assert together[0].status == "complete"
    assert torch.allclose(torch.tensor(together[0].loss_curve), torch.tensor(alone.loss_curve),
                          rtol=1e-5, atol=0)
