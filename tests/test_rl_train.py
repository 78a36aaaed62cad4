"""An rl study trained by the fused engine (tasks/rl.py through train.train_group and the CLI).

One engine step is the GRPO step written out from its parts; K fused trials take the step each
takes alone (sampling, rewards, loss, gradients); micro-batches (train.grad_accum) add up to the
whole step; the KL reference with the adapters switched off is the base model; and a study
trains, records its reward curves, reports, suggests, exports and resumes through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lorasweep.cli import main
from lorasweep.config import validate_study
from lorasweep.dropout import set_training, step_seed
from lorasweep.methods import get_method
from lorasweep.methods.stacked import adapters_disabled
from lorasweep.optim import build_optimizer
from lorasweep.records import read_curves_csv
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.grpo import Rollout, completion_logps, group_advantages, policy_losses
from lorasweep.tasks.rl import RLTask, rows_of
from lorasweep.tasks.rollout import Completions
from lorasweep.train import train_group
from lorasweep.workbench import attach_group, batch_order, load_workbench

from .conftest import kill_mid_run, read_rows, write_jsonl

CELL = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
GROUP = 4


def arithmetic(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def rl_study(tmp_path: Path, **changes: dict) -> dict:
    study = {
        "name": "rl", "seed": 0, "model": {"source": "tiny:llama"},
        "task": {"kind": "rl", "train_file": str(write_jsonl(tmp_path / "train.jsonl",
                                                             arithmetic(48, 0))),
                 "prompt_field": "question", "answer_field": "answer", "validation_size": 8},
        "train": {"steps": 3, "batch_size": 4, "seq_len": 32, "warmup_ratio": 0.0,
                  "schedule": "constant", "eval_batch_size": 8},
        "rl": {"group_size": GROUP, "max_new_tokens": 6},
        "search": {"methods": ["lora"], "ranks": [4], "lora_alpha": [8], "lr": [1e-2, 3e-2],
                   "seeds": [0], "target_modules": "all-linear"},
    }
    for name, value in changes.items():
        study[name] = {**study[name], **value}
    return study


def stand_in_rewards(self, completions, golds, group_size):
    """A reward a random tiny model earns about half the time (even token ids), so advantages
    and gradients are not zero; the real verifier gives 0 to a random model."""
    return (completions.completion_ids.cpu() % 2 == 0).float().mean(1).round()


@pytest.fixture
def rewarded(monkeypatch):
    monkeypatch.setattr(RLTask, "rewards", stand_in_rewards)


def bench_of(tmp_path: Path, **changes: dict):
    study = validate_study(rl_study(tmp_path, **changes), "rl")
    return study, load_workbench(study)


def trials_of(lrs: list[float]) -> list[TrialSpec]:
    return [TrialSpec(grid_id=i, cell=CELL, lr=lr, seed=0) for i, lr in enumerate(lrs)]


@pytest.mark.numerics
def test_engine_step_is_the_grpo_step_written_out(tmp_path, rewarded):
    """One engine step: the step's seed samples, the verifier scores, advantages, the loss of
    tasks/grpo.py and AdamW at the trial's LR; the same weights as those parts run by hand."""
    study, bench = bench_of(tmp_path, train={"steps": 1}, rl={"beta": 0.04})
    (result,) = train_group(bench.base, bench.task, study.train, trials_of([3e-2]),
                            torch.device("cpu"))
    task = bench.task
    model, attached = attach_group(bench.base, task, study.train, trials_of([3e-2]))
    start = {name: param.detach().clone() for name, param in attached.trial_params[0]}
    index = next(batch_order(len(task.train), 4, 1, 0))
    prompts = [task.train.prompts[i] for i in index.tolist()]
    completions = task.sample(model, prompts, GROUP, 1, step_seed(0, 1))
    with torch.no_grad():
        ref = completion_logps(bench.base, completions, 1.0)
    rewards = stand_in_rewards(None, completions, None, GROUP)
    rollout = Rollout(completions, group_advantages(rewards, GROUP), ref_logps=ref)
    optimizer = build_optimizer(get_method("lora"), attached, trials_of([3e-2]), study.train)
    model.train()
    loss = policy_losses(model, rollout, 1, task.objective)
    loss.sum().backward()
    assert float(loss) != 0
    torch.nn.utils.clip_grad_norm_([p for _, p in attached.trial_params[0]], 1.0)
    gradients = {name: param.grad.clone() for name, param in attached.trial_params[0]}
    optimizer.step()
    assert result.loss_curve == pytest.approx([float(loss.detach())], rel=1e-6, abs=1e-9)
    assert result.curves["reward"] == [float(rewards.mean())]
    for name, param in attached.trial_params[0]:
        assert_same_first_adam_step(result.weights[name], param.detach(), gradients[name], 3e-2)
        if name.endswith("lora_B"):  # B starts at 0, so the first step moves B alone
            assert not torch.equal(param, start[name]), name


def assert_same_first_adam_step(ours: torch.Tensor, expected: torch.Tensor,
                                gradient: torch.Tensor, lr: float) -> None:
    """Weights after one AdamW step agree wherever the gradient decides the step. Adam's first
    step moves a weight by lr x g / (|g| + eps), about lr x sign(g): where |g| is at rounding
    level (GRPO's advantages cancel to about 0 in a group whose rewards tie), two correct
    computations of g may step opposite ways, 2 x lr apart, and nothing more."""
    decided = gradient.abs() > 1e-4 * gradient.abs().max()
    assert torch.allclose(ours[decided], expected[decided], rtol=1e-6, atol=1e-8)
    assert float((ours - expected).abs().max()) <= 2 * lr * (1 + 1e-6)


@pytest.mark.numerics
def test_fused_rl_trials_step_as_each_alone(tmp_path, rewarded):
    """K fused trials sample, score and take the loss and gradient of their step as each does
    alone (gradients, not weights after AdamW: see assert_same_first_adam_step)."""
    study, bench = bench_of(tmp_path)
    fused_losses, fused = step_gradients(bench, study.train, [1e-2, 3e-2])
    for i, lr in enumerate([1e-2, 3e-2]):
        alone_loss, (alone,) = step_gradients(bench, study.train, [lr])
        assert torch.allclose(fused_losses[i], alone_loss[0], rtol=1e-5, atol=1e-7)
        assert_same_gradients(fused[i], alone)


def assert_same_gradients(ours: dict, expected: dict) -> None:
    """Each parameter's gradient to 1e-5 of the whole gradient's norm (not zero)."""
    scale = float(torch.cat([g.flatten() for g in expected.values()]).norm())
    assert scale > 0
    for name, gradient in expected.items():
        assert float((ours[name] - gradient).norm()) <= 1e-5 * scale, name


def step_gradients(bench, train, lrs: list[float]) -> tuple[torch.Tensor, list[dict]]:
    """One training step of a group of trials at `lrs`: its losses (K,) and the gradient it
    leaves on each trial's parameters, from where the engine's first step starts (its batch,
    its seeds)."""
    task, trials = bench.task, trials_of(lrs)
    model, attached = attach_group(bench.base, task, train, trials)
    set_training(model, train)
    index = next(batch_order(len(task.train), train.batch_size, 1, 0))
    torch.manual_seed(step_seed(0, 1))
    outcome = task.train_step(model, index, len(trials), train,
                              torch.ones(len(trials), dtype=torch.bool), step_seed(0, 1))
    return outcome.losses.detach(), [{name: p.grad.clone() for name, p in params}
                                     for params in attached.trial_params]


@pytest.mark.numerics
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_add_up_to_the_step(tmp_path, rewarded, loss_type):
    """grad_accum 2 leaves the loss and the gradient one whole batch leaves (each micro-batch's
    loss over the step's denominator). Compared before the optimizer, not as weights after it
    (see assert_same_first_adam_step)."""
    study, bench = bench_of(tmp_path, rl={"loss_type": loss_type})
    whole_loss, (whole,) = step_gradients(bench, study.train, [3e-2])
    parts_loss, (parts,) = step_gradients(
        bench, study.train.model_copy(update={"grad_accum": 2}), [3e-2])
    assert float(whole_loss[0]) != 0
    assert torch.allclose(parts_loss, whole_loss, rtol=1e-5, atol=1e-7)
    assert_same_gradients(parts, whole)


@pytest.mark.parametrize(("prompts", "parts"), [(4, 2), (5, 2), (1, 2), (3, 3)])
def test_micro_batches_cover_every_row_once(prompts, parts):
    """Every row of a K-block rollout in exactly one micro-batch, each micro-batch the same
    prompts of every trial's block, none empty, also for a short batch (fewer prompts than
    grad_accum, or not divisible by it)."""
    k = 3
    shares = rows_of(prompts, GROUP, k, parts)
    assert sorted(torch.cat(shares).tolist()) == list(range(k * prompts * GROUP))
    assert len(shares) == min(prompts, parts) and all(len(rows) for rows in shares)
    for rows in shares:
        blocks = rows.view(k, -1)
        assert (blocks - blocks[:1] == torch.arange(k)[:, None] * prompts * GROUP).all()


def test_adapters_switched_off_score_as_the_base(tmp_path):
    """The KL's reference (rl.beta > 0) costs no second copy: the trained model with its
    adapters off gives the base model's log-probs, B != 0 and DoRA included."""
    study, bench = bench_of(tmp_path)
    for method in ("lora", "dora"):
        cell = dataclasses.replace(CELL, method=method)
        model, attached = attach_group(bench.base, bench.task, study.train,
                                       [TrialSpec(grid_id=0, cell=cell, lr=1e-2, seed=0)] * 2)
        with torch.no_grad():
            for _, param in attached.trial_params[1]:
                param.add_(0.3)
        completions = bench.task.sample(model, bench.task.train.prompts[:2], 2, 2, 0)
        with torch.no_grad():
            on = completion_logps(model, completions)
            with adapters_disabled(model):
                off = completion_logps(model, completions)
            base = completion_logps(bench.base, completions)
        assert torch.allclose(off, base, atol=1e-6), method
        assert not torch.allclose(on, base, atol=1e-3), method


def run(tmp_path: Path, study: dict, *args: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), *args]) == 0
    return out


def test_verifier_scores_the_last_number(tmp_path):
    """1 for a completion whose last number is the gold answer (as the math task reads it),
    per row of K blocks of prompts x group."""
    _, bench = bench_of(tmp_path)
    task, tokenizer = bench.task, bench.task.tokenizer
    texts = ["so 3 + 4 = 7", "it is 7.", "8", "the answer is 1000", "1000 or 7", "none"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    padded = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    completions = Completions(padded, mask, mask)
    # K = 2 blocks of one prompt x 3 completions: golds 7 for every block's prompt
    assert task.rewards(completions, ["7"], 3).tolist() == [1, 1, 0, 0, 1, 0]
    # K = 1 block of one prompt x 6 completions: the last number counts
    assert task.rewards(completions, ["1000"], 6).tolist() == [0, 0, 0, 1, 0, 0]


def test_rl_study_runs_reports_suggests_and_exports(tmp_path, capsys, rewarded):
    """Through the CLI: every trial complete with its reward curve and its mean_reward, the
    report with the reward section, suggest and a PEFT adapter over the base."""
    study = rl_study(tmp_path, search={"methods": ["lora", "full"], "lr": [1e-3, 3e-2, 3e-1]},
                     train={"eval_every": 2, "steps": 4}, rl={"eval_samples": 4})
    out = run(tmp_path, study)
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and all(",complete," in row for row in rows[1:])
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "mean_reward" in report and "Reward during training" in report
    assert main(["suggest", "--from", str(out), "--to", "full"]) == 0
    assert main(["export", str(out), "--trial", "0", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "task_type"] == "CAUSAL_LM"


def test_rl_study_killed_mid_trial_resumes(tmp_path):
    """SIGKILLed while a trial trains, the rerun trains it again from scratch and each trial
    ends complete exactly once, with its whole reward curve."""
    study = rl_study(tmp_path, search={"lr": [1e-3, 3e-3, 1e-2]}, train={"steps": 6})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    command = ["run", str(path), "--out", str(out), "--max-group", "1"]
    before = kill_mid_run(command, out, "rl", complete=1, running=1)
    assert main(command) == 0
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["complete"] * 3
    assert sorted(r["attempts"] for r in rows) == ["1"] * (3 - list(before.values()).count(
        "running")) + ["2"]
    curves = read_curves_csv(out)
    assert sorted(curves) == [0, 1, 2] and all(len(c["reward"]) == 6 for c in curves.values())
