"""Reinforcement learning with a verifiable reward (GRPO), as a task the fused engine trains.

A training step samples `rl.group_size` completions of each of its `train.batch_size` prompts
from every trial's own policy (tasks/rollout.py: K fused trials in one `generate`), scores them
with the study's verifier (tasks/verifiers.py: the right number, or tests passed in the sandbox),
normalizes the rewards within each prompt's group and takes the clipped policy-gradient step of
tasks/grpo.py; the trials of a group draw from the same noise (the step's seed), so LRs compare
on common random numbers. The validation metric is the mean reward of seeded samples on the
held-out prompts, the same noise for every trial and every evaluation.

Everything else (optimizer, schedule, clipping, divergence, evaluation cadence, best-of,
store, report) is the engine's, as for any task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorasweep.config import RLSpec, Study, TrainSpec
from lorasweep.errors import StudyError
from lorasweep.methods.stacked import adapters_disabled
from lorasweep.precision import autocast
from lorasweep.tasks.base import StepOutcome, Task
from lorasweep.tasks.data import RawSplits, Records, require_field
from lorasweep.tasks.grpo import (
    Objective,
    Rollout,
    completion_logps,
    group_advantages,
    policy_losses,
    trial_counts,
)
from lorasweep.tasks.instruction import (
    PromptSplit,
    format_prompt,
    tokenize_pairs,
    uses_chat_template,
)
from lorasweep.tasks.rollout import Completions, sample_completions
from lorasweep.tasks.verifiers import Verifier, verifier_for

EVAL_STREAM = 7919  # offset of the evaluation's sampling seeds from the study seed


def objective_of(rl: RLSpec) -> Objective:
    return Objective(max_new_tokens=rl.max_new_tokens, loss_type=rl.loss_type,
                     epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, beta=rl.beta,
                     kl_ratio_correction=rl.kl_ratio_correction,
                     scale_rewards=rl.scale_rewards, temperature=rl.temperature)


@contextlib.contextmanager
def sampling(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout while it samples and scores the reference), each
    module's own mode put back after: a training step's mode (dropout.set_training) is per
    module."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def rows_of(prompts: int, group: int, k: int, parts: int) -> list[torch.Tensor]:
    """The rows of each micro-batch of a rollout laid out as K blocks of `prompts` x `group`
    rows: the same prompts' rows of every trial's block (so each micro-batch keeps the K blocks
    the stacked layers split), in `parts` shares as even as the prompts allow (a short last batch
    of an epoch may hold fewer prompts than `parts`: no share is empty)."""
    block = prompts * group
    shares = [share for share in torch.arange(prompts).tensor_split(parts) if len(share)]
    return [torch.cat([t * block + (share[:, None] * group + torch.arange(group)).flatten()
                       for t in range(k)]) for share in shares]


class RLTask(Task):
    """Reports mean_reward: the verifier's mean over `rl.eval_samples` seeded samples of each
    held-out prompt. Per step, each trial's mean training reward is its `reward` curve."""

    loss_grows_when_diverging = False  # the surrogate is about 0, of either sign

    def __init__(self, train: PromptSplit, validation: PromptSplit, test: PromptSplit | None,
                 tokenizer: PreTrainedTokenizerBase, rl: RLSpec, seed: int,
                 verifier: Verifier) -> None:
        super().__init__(train, validation, test)
        self.tokenizer = tokenizer
        self.rl = rl
        self.verifier = verifier
        self.objective = objective_of(rl)
        self.eval_seed = seed + EVAL_STREAM

    def sample(self, model: nn.Module, prompts: list[list[int]], group_size: int, k: int,
               seed: int) -> Completions:
        return sample_completions(model, prompts, group_size, [seed] * k, self.rl.temperature,
                                  self.rl.max_new_tokens, self.tokenizer.pad_token_id,
                                  self.tokenizer.eos_token_id)

    def rewards(self, completions: Completions, references: list, group_size: int
                ) -> torch.Tensor:
        """The verifier's reward (1.0 or 0.0) of each completion against its prompt's reference;
        (rows,) laid out as the completions (K blocks of prompts x group_size)."""
        texts = [self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(completions.completion_ids.cpu(),
                                      completions.completion_mask.cpu(), strict=True)]
        per_block = len(references) * group_size
        rows = [references[(row % per_block) // group_size] for row in range(len(texts))]
        return torch.tensor(self.verifier.rewards(texts, rows))

    def train_step(self, model: nn.Module, index: torch.Tensor, k: int, train: TrainSpec,
                   active: torch.Tensor, seed: int) -> StepOutcome:
        """Sample, score, normalize, and the backward of the GRPO loss in `train.grad_accum`
        micro-batches of prompts (each micro-batch's loss over the whole step's denominator,
        so they add up to the step's loss)."""
        device, group = active.device, self.rl.group_size
        prompts = [self.train.prompts[i] for i in index.tolist()]
        references = [self.train.references[i] for i in index.tolist()]
        with sampling(model), autocast(train, device):
            completions = self.sample(model, prompts, group, k, seed)
            ref = None
            if self.objective.beta > 0:
                with adapters_disabled(model):
                    ref = completion_logps(model, completions, self.objective.temperature)
        rewards = self.rewards(completions, references, group)
        advantages = group_advantages(rewards, group, k, self.rl.scale_rewards).to(device)
        counts = trial_counts(completions.completion_mask, k, self.objective)
        losses = torch.zeros(k, device=device)
        for rows in rows_of(len(prompts), group, k, train.grad_accum):
            rows = rows.to(device)
            part = Rollout(Completions(completions.input_ids[rows],
                                       completions.attention_mask[rows],
                                       completions.completion_mask[rows]),
                           advantages[rows], ref_logps=None if ref is None else ref[rows])
            with autocast(train, device):
                loss = policy_losses(model, part, k, self.objective, counts)
            torch.where(active, loss, torch.zeros_like(loss)).sum().backward()
            losses += loss.detach()
        reward = rewards.view(k, -1).mean(1)
        return StepOutcome(losses, {"reward": reward})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: PromptSplit, k: int, batch_size: int,
                 device: torch.device) -> list[dict]:
        """Each trial's mean reward on `split`, sampled from seeds fixed by the study seed."""
        samples = self.rl.eval_samples
        total = torch.zeros(k, dtype=torch.float64)
        for start in range(0, len(split), batch_size):
            prompts = split.prompts[start:start + batch_size]
            completions = self.sample(model, prompts, samples, k, self.eval_seed + start)
            rewards = self.rewards(completions, split.references[start:start + batch_size],
                                   samples)
            total += rewards.view(k, -1).sum(1).double()
        return [{"mean_reward": float(value) / (len(split) * samples)} for value in total]

    def _supervised(self) -> StudyError:
        return StudyError("task.kind rl: its loss is computed from the completions each step "
                          "samples, not from a fixed batch")

    def trial_losses(self, logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        raise self._supervised()

    def loss_count(self, labels: torch.Tensor) -> int:
        raise self._supervised()

    def eval_terms(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, int, torch.Tensor]:
        raise self._supervised()

    def summarize(self, loss_sum: torch.Tensor, count: int, correct: torch.Tensor) -> list[dict]:
        raise self._supervised()


def build_rl(study: Study, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
             seq_len: int) -> RLTask:
    """Prompts (in the model's chat template when it has one) and what the verifier checks their
    completions against; a prompt keeps at most `seq_len` tokens (its end)."""
    spec, rl = study.task, study.rl
    assert rl is not None
    for name in (spec.prompt_field, spec.response_field, spec.answer_field):
        if name is not None:
            require_field(raw, name, "task.prompt_field/response_field/answer_field")
    verifier = verifier_for(rl.verifier, spec)
    templated = uses_chat_template(tokenizer, spec.chat_template)

    def prompts_of(records: Records, split: str) -> PromptSplit:
        prompts = [format_prompt(tokenizer, verifier.prompt(r, templated), templated)
                   for r in records]
        references = [verifier.reference(r, raw.where(split, i)) for i, r in enumerate(records)]
        # each row holds its prompt and an eos, no response (what data-driven inits and memory
        # probes read); the completions are sampled each step
        return tokenize_pairs(tokenizer, prompts, [""] * len(prompts), references, seq_len,
                              "response", templated)

    train, validation = prompts_of(raw.train, "training"), prompts_of(raw.validation, "validation")
    test = None if raw.test is None else prompts_of(raw.test, "test")
    return RLTask(train, validation, test, tokenizer, rl, study.seed, verifier)

