"""The GRPO objective: group-normalized advantages and a clipped policy-gradient loss per trial.

It computes what TRL's GRPOTrainer computes (trl 1.16: the advantages of
`_generate_and_score_completions`, the loss of `_compute_loss`; tests/test_rl_objective.py checks
both against TRL's own code) so that one process can train K trials over one base, which TRL's
trainer cannot. Rows are laid out as the fused trainer lays them (methods/stacked.py): trial 0's
rows, then trial 1's, ...; within a trial, each prompt's G completions are consecutive. Every
normalization and every reduction runs on one trial's block alone, so a trial computes the same
numbers alone or in a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from torch import nn

from lorasweep.config import RLSpec
from lorasweep.tasks.rollout import Completions

LOSS_TYPES = get_args(RLSpec.model_fields["loss_type"].annotation)
REWARD_SCALES = get_args(RLSpec.model_fields["scale_rewards"].annotation)
STD_EPS = 1e-4  # TRL's: keeps a group whose rewards are all equal at advantage 0


@dataclass(frozen=True)
class Objective:
    """How a step's completions become a loss (the study file's `rl` section, config.RLSpec,
    names the same fields); TRL's GRPOConfig names in brackets.

    loss_type: how token losses become one number: grpo, each sequence's mean then the mean over
    sequences; bnpo and dapo, the mean over all completion tokens of the step; dr_grpo, the sum
    over tokens / (sequences x max_new_tokens), free of length bias. TRL's bnpo differs from its
    dapo only when a step is split over accumulation steps (each part over its own tokens);
    lorasweep divides every micro-batch of train.grad_accum by the whole step's denominator, so
    there its bnpo is dapo (with grad_accum 1 both are TRL's).
    epsilon, epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (epsilon_high
    None: epsilon). beta: weight of the k3 estimate of KL(policy || base); with
    kl_ratio_correction [use_bias_correction_kl] the KL term is weighted by the importance ratio.
    scale_rewards: divide advantages by the std of the group's rewards, of the trial's whole
    batch, or not at all. temperature: the sampling temperature, which log-probs are taken at.
    """

    max_new_tokens: int  # [max_completion_length]
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    kl_ratio_correction: bool = True
    scale_rewards: str = "group"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"scale_rewards {self.scale_rewards!r}: one of "
                             f"{', '.join(REWARD_SCALES)}")

    @property
    def clip_range(self) -> tuple[float, float]:
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return 1 - self.epsilon, 1 + high


@dataclass
class Rollout:
    """One step's sampled completions for K trials (K blocks of rows), ready for the loss.

    `old_logps` are the log-probs under the policy that sampled (None: the policy being trained,
    the on-policy case, where the ratio is exp(0) = 1 but its gradient is not zero);
    `ref_logps` under the base model, needed only when beta > 0.
    """

    completions: Completions
    advantages: torch.Tensor  # (K*B,)
    old_logps: torch.Tensor | None = None  # (K*B, C)
    ref_logps: torch.Tensor | None = None  # (K*B, C)


def group_advantages(rewards: torch.Tensor, group_size: int, k: int = 1,
                     scale: str = "group") -> torch.Tensor:
    """Each completion's reward minus its group's mean reward, over the group's (or the trial's
    batch's) sample std + STD_EPS unless `scale` is "none". rewards: (K*B,), groups of
    `group_size` consecutive rows."""
    out = []
    for block in rewards.float().chunk(k):
        groups = block.view(-1, group_size)
        centred = groups - groups.mean(dim=1, keepdim=True)
        if scale == "group":
            centred = centred / (groups.std(dim=1, keepdim=True) + STD_EPS)
        elif scale == "batch":
            centred = centred / (block.std() + STD_EPS)
        out.append(centred.reshape(-1))
    return torch.cat(out)


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                 objective: Objective, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss (rows, C): the negated clipped surrogate, plus beta times the k3 KL."""
    ratio = torch.exp(logps - old_logps)
    low, high = objective.clip_range
    advantage = advantages.unsqueeze(1)
    loss = -torch.min(ratio * advantage, ratio.clamp(low, high) * advantage)
    if objective.beta == 0.0:
        return loss
    assert ref_logps is not None, "beta > 0 needs the base model's log-probs"
    log_ref_ratio = ref_logps - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3: unbiased, never negative
    if objective.kl_ratio_correction:
        kl = kl * ratio
    return loss + objective.beta * kl


def reduce_trials(losses: torch.Tensor, mask: torch.Tensor, k: int,
                  objective: Objective) -> torch.Tensor:
    """Each trial's loss (K,) from per-token losses and the completion mask, block by block."""
    return trial_sums(losses, mask, k, objective) / trial_counts(mask, k, objective)


def trial_sums(losses: torch.Tensor, mask: torch.Tensor, k: int,
               objective: Objective) -> torch.Tensor:
    """The numerator of each trial's loss (K,): what its rows add, so the micro-batches of one
    step (rows split over train.grad_accum) add up to the whole step's numerator."""
    out = []
    for loss, weight in zip(losses.chunk(k), mask.chunk(k), strict=True):
        masked = loss * weight.to(loss.dtype)
        if objective.loss_type == "grpo":  # each sequence's mean, summed
            out.append((masked.sum(-1) / weight.sum(-1).clamp(min=1)).sum())
        else:
            out.append(masked.sum())
    return torch.stack(out)


def trial_counts(mask: torch.Tensor, k: int, objective: Objective) -> torch.Tensor:
    """The denominator of each trial's loss (K,) over the step's whole completion mask:
    sequences (grpo), sequences x max_new_tokens (dr_grpo), completion tokens (bnpo, dapo)."""
    out = []
    for weight in mask.chunk(k):
        if objective.loss_type == "grpo":
            out.append(float(weight.shape[0]))
        elif objective.loss_type == "dr_grpo":
            out.append(float(weight.shape[0] * objective.max_new_tokens))
        else:
            out.append(max(float(weight.sum()), 1.0))
    return torch.tensor(out, device=mask.device)


def completion_logps(model: nn.Module, completions: Completions,
                     temperature: float = 1.0) -> torch.Tensor:
    """Log-probability (rows, C) of each completion token given the tokens before it, at the
    sampling temperature, computed in fp32. Positions count from each row's first prompt token,
    as `generate` counts them for a left-padded prompt."""
    mask = completions.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=completions.input_ids, attention_mask=mask,
                   position_ids=positions).logits
    length = completions.completion_mask.shape[1]
    logits = logits[:, -length - 1:-1].float() / temperature
    targets = completions.completion_ids.unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


def policy_losses(model: nn.Module, rollout: Rollout, k: int, objective: Objective,
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    """Each of the K trials' GRPO loss (K,) on its own block of the rollout; their sum's
    gradient is each trial's own, since trials share no trainable tensor. `counts`: the whole
    step's denominators (trial_counts) when the rollout is one micro-batch of the step, so the
    micro-batches' losses add up to the step's."""
    logps = completion_logps(model, rollout.completions, objective.temperature)
    old = logps.detach() if rollout.old_logps is None else rollout.old_logps
    losses = token_losses(logps, old, rollout.advantages, objective, rollout.ref_logps)
    mask = rollout.completions.completion_mask
    if counts is None:
        return reduce_trials(losses, mask, k, objective)
    return trial_sums(losses, mask, k, objective) / counts
