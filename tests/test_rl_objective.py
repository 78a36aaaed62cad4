"""The GRPO objective (tasks/grpo.py) is TRL's, and one lorasweep RL step is a plain one.

1. The loss equals TRL 1.16's on the same completions, log-probs, old and reference log-probs,
   advantages and masks, to 1e-6, and so does its gradient with respect to the log-probs: for
   every loss type, with the clipping active, with and without the KL term. TRL's own code runs:
   `GRPOTrainer._compute_loss` is called unbound on a stand-in `self` that holds the settings it
   reads, an accelerator of one process, and a log-prob method returning the given log-probs (so
   no model, tokenizer or dataset is built).
   And on TRL's own rollout: a real GRPOTrainer (PEFT LoRA on tiny Llama) samples completions,
   takes the reference log-probs with its adapter off and turns fixed rewards into advantages
   (`_generate_and_score_completions`); lorasweep's advantages equal TRL's for every reward
   scaling, and `policy_losses` on that rollout equals `_compute_loss` on the same model, loss
   and every LoRA gradient, so the log-probs (temperature, shift) agree too.
2. One RL step on tiny Llama with lorasweep's LoRA (workbench.attach_trials) leaves the same
   weights, to 1e-6, as a step written plainly here: stock PEFT LoRA on the same base, the same
   completions, the loss typed out in torch, torch's AdamW.
3. K = 2 fused trials, each with its own completions, rewards and LR, compute what each computes
   alone: the objective on random tensors and the step on tiny Llama.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import GRPOConfig, GRPOTrainer

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.methods import get_method
from lorasweep.methods.targets import resolve_targets
from lorasweep.models import load_model, load_tokenizer
from lorasweep.optim import build_optimizer
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.grpo import (
    LOSS_TYPES,
    REWARD_SCALES,
    Objective,
    Rollout,
    completion_logps,
    group_advantages,
    policy_losses,
    reduce_trials,
    token_losses,
)
from lorasweep.tasks.rollout import Completions
from lorasweep.workbench import attach_trials

# every test here compares two computations of the same numbers (tests/test_threads.py)
pytestmark = pytest.mark.numerics

TOL = 1e-6
ROWS, LENGTH, GROUP = 8, 6, 4  # 2 prompts x 4 completions, up to 6 completion tokens


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).detach().norm() / ref.detach().norm().clamp(min=1e-30))


def same_loss(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal to TOL, relative above 1 and absolute below (a GRPO loss is a sum of advantages,
    which cancel to near zero, so its relative rounding is large)."""
    return abs(float((ours - ref).detach())) <= TOL * max(1.0, abs(float(ref.detach())))


def random_batch(seed: int, rows: int = ROWS) -> dict[str, torch.Tensor]:
    """Log-probs that move the ratio past the clip range both ways, ragged completions, and
    0/1 rewards as the math verifier gives."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, LENGTH, generator=g) * 3
    mask = torch.ones(rows, LENGTH)
    for row in range(rows):
        mask[row, int(torch.randint(1, LENGTH + 1, (1,), generator=g)):] = 0
    return {"logps": logps,
            "old_logps": logps + torch.randn(rows, LENGTH, generator=g) * 0.4,
            "ref_logps": logps + torch.randn(rows, LENGTH, generator=g) * 0.3,
            "mask": mask,
            "rewards": torch.randint(0, 2, (rows,), generator=g).float()}


class OneProcess:
    """The part of accelerate.Accelerator that `_compute_loss` touches, for one process."""

    num_processes = 1

    @staticmethod
    def reduce(x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def trl_loss(batch: dict[str, torch.Tensor], logps: torch.Tensor, advantages: torch.Tensor,
             objective: Objective) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss on these tensors (see the module docstring)."""
    args = SimpleNamespace(use_bias_correction_kl=objective.kl_ratio_correction, delta=None,
                           steps_per_generation=1)
    low, high = objective.clip_range
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (logps, torch.zeros_like(logps),
                                                              None),
        args=args, beta=objective.beta, loss_type=objective.loss_type, epsilon_low=1 - low,
        epsilon_high=high - 1, max_completion_length=objective.max_new_tokens,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)}, accelerator=OneProcess())
    mask = batch["mask"].long()
    inputs = {"prompt_ids": torch.zeros(len(mask), 0, dtype=torch.long),
              "prompt_mask": torch.zeros(len(mask), 0, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": batch["old_logps"],
              "ref_per_token_logps": batch["ref_logps"],
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


OBJECTIVES = [Objective(max_new_tokens=LENGTH + 2, loss_type=loss, beta=beta,
                        kl_ratio_correction=corrected, epsilon_high=high)
              for loss in LOSS_TYPES for beta, corrected in [(0.0, True), (0.04, True),
                                                             (0.04, False)]
              for high in [None, 0.28]]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: (
    f"{o.loss_type}-beta{o.beta}-{'corrected' if o.kl_ratio_correction else 'plain'}"
    f"-high{o.epsilon_high}"))
def test_loss_and_gradient_equal_trl(objective):
    batch = random_batch(0)
    advantages = group_advantages(batch["rewards"], GROUP, scale=objective.scale_rewards)
    mine = batch["logps"].clone().requires_grad_()
    theirs = batch["logps"].clone().requires_grad_()
    ours = reduce_trials(token_losses(mine, batch["old_logps"], advantages, objective,
                                      batch["ref_logps"]), batch["mask"], 1, objective)[0]
    ref = trl_loss(batch, theirs, advantages, objective)
    low, high = objective.clip_range
    ratio = (batch["logps"] - batch["old_logps"]).exp()[batch["mask"].bool()]
    assert (ratio < low).any() and (ratio > high).any()  # both clip bounds are exercised
    assert same_loss(ours, ref)
    ours.backward()
    ref.backward()
    assert rel_err(mine.grad, theirs.grad) < TOL


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_objective_is_each_trial_alone(loss_type):
    """Trial k's loss from a K = 2 batch is its loss computed alone, and its advantages too,
    under batch-level reward scaling as well."""
    objective = Objective(max_new_tokens=LENGTH, loss_type=loss_type, beta=0.04,
                          scale_rewards="batch")
    trials = [random_batch(1), random_batch(2)]
    fused = {key: torch.cat([t[key] for t in trials]) for key in trials[0]}
    advantages = group_advantages(fused["rewards"], GROUP, k=2, scale="batch")
    losses = reduce_trials(token_losses(fused["logps"], fused["old_logps"], advantages,
                                        objective, fused["ref_logps"]), fused["mask"], 2,
                           objective)
    for trial, loss, fused_advantages in zip(trials, losses, advantages.chunk(2), strict=True):
        alone = group_advantages(trial["rewards"], GROUP, scale="batch")
        assert torch.equal(alone, fused_advantages)
        single = reduce_trials(token_losses(trial["logps"], trial["old_logps"], alone, objective,
                                            trial["ref_logps"]), trial["mask"], 1, objective)
        assert torch.equal(single[0], loss)


# --- one RL step on tiny Llama --------------------------------------------------------------

PROMPT = 5
STEP_OBJECTIVE = Objective(max_new_tokens=LENGTH, loss_type="grpo", beta=0.04, temperature=0.7)
CELL = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
TRAIN = TrainSpec(steps=1, weight_decay=0.01)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    spec = ModelSpec(source="tiny:llama")
    return load_model(spec, "causal_lm", None, load_tokenizer(spec))


def rollout(base: torch.nn.Module, seed: int, on_policy: bool) -> Rollout:
    """G completions of two prompts as a sampler would leave them (ragged, right-padded), 0/1
    rewards, the base's log-probs as reference, and (off-policy) old log-probs far enough from
    the policy's that the clipping acts."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1000, 5000, (ROWS // GROUP, PROMPT), generator=g)
    ids = torch.cat([prompts.repeat_interleave(GROUP, 0),
                     torch.randint(1000, 5000, (ROWS, LENGTH), generator=g)], 1)
    completion_mask = random_batch(seed)["mask"].long()
    attention_mask = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), completion_mask], 1)
    rewards = torch.randint(0, 2, (ROWS,), generator=g).float()
    completions = Completions(ids, attention_mask, completion_mask)
    with torch.no_grad():
        ref = completion_logps(base, completions, STEP_OBJECTIVE.temperature)
    old = None if on_policy else ref + torch.randn(ref.shape, generator=g) * 0.3
    return Rollout(completions, group_advantages(rewards, GROUP),
                   old_logps=old, ref_logps=ref)


def lorasweep_step(base: torch.nn.Module, lrs: list[float], rollouts: list[Rollout]
                   ) -> list[dict[str, torch.Tensor]]:
    """K = len(lrs) trials attached as training attaches them, one step of `policy_losses`
    and the trainer's AdamW; each trial's weights after it."""
    trials = [TrialSpec(grid_id=i, cell=CELL, lr=lr, seed=0) for i, lr in enumerate(lrs)]
    model, attached = attach_trials(base, trials)
    params = [dict(p) for p in attached.trial_params]
    nonzero_b(params)
    fused = Rollout(Completions(*(torch.cat([getattr(r.completions, f.name) for r in rollouts])
                                  for f in fields(Completions))),
                    *(None if getattr(rollouts[0], f.name) is None
                      else torch.cat([getattr(r, f.name) for r in rollouts])
                      for f in fields(Rollout)[1:]))
    optimizer = build_optimizer(get_method("lora"), attached, trials, TRAIN)
    policy_losses(model, fused, len(lrs), STEP_OBJECTIVE).sum().backward()
    optimizer.step()
    return [{name: p.detach().clone() for name, p in trial.items()} for trial in params]


def nonzero_b(trials: list[dict[str, torch.nn.Parameter]]) -> None:
    """B starts at zero; a non-zero one makes the adapters shape the outputs and A's gradient."""
    with torch.no_grad():
        for params in trials:
            for name, param in params.items():
                if name.endswith("lora_B"):
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def plain_step(base: torch.nn.Module, start: dict[str, torch.Tensor], lr: float,
               batch: Rollout, on_policy: bool) -> dict[str, torch.Tensor]:
    """The reference: PEFT LoRA from the same weights, GRPO's loss typed out, torch's AdamW."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=resolve_targets(base, "all-linear"))
    model = get_peft_model(copy.deepcopy(base), config).eval()
    params = {name.removeprefix("base_model.model.").replace(".default.weight", ""): p
              for name, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(start)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(start[name])
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=TRAIN.weight_decay,
                                  betas=(TRAIN.adam_beta1, TRAIN.adam_beta2), eps=TRAIN.adam_eps)
    ids = batch.completions.input_ids
    logits = model(input_ids=ids, attention_mask=batch.completions.attention_mask).logits
    logits = logits[:, PROMPT - 1:-1] / STEP_OBJECTIVE.temperature
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, PROMPT:, None])[..., 0]
    old = logps.detach() if on_policy else batch.old_logps
    ratio = torch.exp(logps - old)
    advantage = batch.advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, torch.clamp(ratio, 0.8, 1.2) * advantage)
    kl = torch.exp(batch.ref_logps - logps) - (batch.ref_logps - logps) - 1
    per_token = -surrogate + STEP_OBJECTIVE.beta * kl * ratio
    mask = batch.completions.completion_mask.float()
    loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    loss.backward()
    optimizer.step()
    return {name: p.detach() for name, p in params.items()}


def start_weights(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A trial's weights before its first step (non-zero B), as lorasweep_step starts them."""
    _, attached = attach_trials(base, [TrialSpec(grid_id=0, cell=CELL, lr=1.0, seed=0)])
    params = [dict(attached.trial_params[0])]
    nonzero_b(params)
    return {name: p.detach().clone() for name, p in params[0].items()}


@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "clipped"])
def test_one_step_equals_plain_step(base, on_policy):
    batch = rollout(base, 0, on_policy)
    start = start_weights(base)
    (ours,) = lorasweep_step(base, [1e-2], [batch])
    ref = plain_step(base, start, 1e-2, batch, on_policy)
    for name, param in ref.items():
        assert rel_err(ours[name], param) < TOL, name
        assert rel_err(param, start[name]) > 1e-4, name  # the step moved every weight


def test_fused_step_is_each_trial_alone(base):
    """Two trials, each with its own completions, rewards and LR, stepped in one group."""
    lrs, batches = [1e-2, 3e-2], [rollout(base, 1, False), rollout(base, 2, False)]
    fused = lorasweep_step(base, lrs, batches)
    for lr, batch, together in zip(lrs, batches, fused, strict=True):
        (alone,) = lorasweep_step(base, [lr], [batch])
        for name, param in alone.items():
            assert rel_err(together[name], param) < TOL, name


# --- on TRL's own rollout -------------------------------------------------------------------

PROMPTS = ["one two three", "four five six"]
REWARDS = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])  # the second prompt's group: all equal


@pytest.fixture(scope="module")
def trl_trainer(base, tmp_path_factory) -> GRPOTrainer:
    """TRL's GRPOTrainer over PEFT LoRA on tiny Llama: the two prompts x GROUP completions a
    step, each completion's reward fixed by its row, fp32 throughout (TRL's config defaults to
    bf16). B is made non-zero so that the policy is not the base and the KL term acts."""
    tokenizer = load_tokenizer(ModelSpec(source="tiny:llama"))
    tokenizer.eos_token = "[SEP]"  # MiniLM's tokenizer has none, and TRL's generate needs one
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False,
                      per_device_train_batch_size=ROWS, num_generations=GROUP,
                      max_completion_length=LENGTH, temperature=STEP_OBJECTIVE.temperature,
                      beta=STEP_OBJECTIVE.beta, report_to=[])
    with torch.random.fork_rng():  # the Trainer seeds torch's global generator
        trainer = GRPOTrainer(model=copy.deepcopy(base), reward_funcs=lambda completions, **_:
                              REWARDS.tolist(), args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                              peft_config=LoraConfig(r=4, lora_alpha=8,
                                                     target_modules=resolve_targets(
                                                         base, "all-linear")))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which never runs
    nonzero_b([{name.replace(".default.weight", ""): p
                for name, p in trainer.model.named_parameters() if p.requires_grad}])
    trainer.model.train()
    return trainer


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scale", REWARD_SCALES)
def test_equal_trl_on_its_own_rollout(trl_trainer, scale):
    """TRL samples the completions, takes the reference log-probs (its adapter switched off) and
    computes the advantages (`_generate_and_score_completions`); lorasweep's advantages from the
    same rewards equal TRL's, and for every loss type lorasweep's `policy_losses` on that rollout
    equals TRL's `_compute_loss` on the same model, and so does every LoRA weight's gradient."""
    trl_trainer.scale_rewards = scale
    with torch.random.fork_rng():  # TRL samples from torch's global generator
        torch.manual_seed(0)
        out = trl_trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS
                                                           for _ in range(GROUP)])
    advantages = group_advantages(REWARDS, GROUP, scale=scale)
    assert rel_err(advantages, out["advantages"]) < TOL
    completions = Completions(torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
                              torch.cat([out["prompt_mask"], out["completion_mask"]], 1),
                              out["completion_mask"])
    batch = Rollout(completions, advantages, ref_logps=out["ref_per_token_logps"])
    model = trl_trainer.model
    for loss_type in LOSS_TYPES:
        trl_trainer.loss_type = loss_type
        objective = Objective(max_new_tokens=LENGTH, loss_type=loss_type,
                              beta=STEP_OBJECTIVE.beta, temperature=STEP_OBJECTIVE.temperature)
        ref = trl_trainer._compute_loss(model, out)
        ref_grads = gradients(model, ref)
        assert all(grad.norm() > 0 for grad in ref_grads.values())  # A and B both learn
        ours = policy_losses(model, batch, 1, objective)[0]
        assert same_loss(ours, ref), loss_type
        for name, grad in gradients(model, ours).items():
            assert rel_err(grad, ref_grads[name]) < TOL, (loss_type, name)
