"""Sampling G completions per prompt for K fused trials (tasks/rollout.py) on tiny Llama.

The Gumbel race samples softmax(logits / temperature); a trial samples the same completions
alone or fused (left-padded prompts, the KV cache of `generate`), and the tokens that one full
forward of the sampled rows gives with the same noise; a completion's mask ends at its
first eos; the log-probs the loss takes of a left-padded row are those of the row unpadded; and
a whole RL step of K = 2 fused trials, sampling included, is each trial's step alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorasweep.config import ModelSpec, TrainSpec
from lorasweep.methods import get_method
from lorasweep.models import load_model, load_tokenizer
from lorasweep.optim import build_optimizer
from lorasweep.space import Cell, TrialSpec
from lorasweep.tasks.grpo import (
    Objective,
    Rollout,
    completion_logps,
    group_advantages,
    policy_losses,
)
from lorasweep.tasks.rollout import Completions, TrialGumbel, sample_completions
from lorasweep.workbench import attach_trials

from .conftest import differing_pair

# every test here compares two computations of the same numbers (tests/test_threads.py)
pytestmark = pytest.mark.numerics

CELL = Cell(method="lora", rank=4, lora_alpha="8", init="kaiming", target_modules="all-linear")
GROUP, NEW = 3, 6
SAMPLING = dict(group_size=GROUP, temperature=0.7, max_new_tokens=NEW, pad_id=0)


def test_gumbel_race_samples_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    draws = 40_000
    race = TrialGumbel([0], temperature=0.7)
    picks = race(torch.zeros(draws, 1, dtype=torch.long), logits.repeat(draws, 1)).argmax(-1)
    frequencies = torch.bincount(picks, minlength=5).float() / draws
    assert (frequencies - torch.softmax(logits[0] / 0.7, -1)).abs().max() < 0.01


@pytest.fixture(scope="module")
def models():
    """A K=2 group whose trial 1 has other weights than trial 0, trial 1 alone, two prompts of
    different lengths, and the base."""
    spec = ModelSpec(source="tiny:llama")
    tokenizer = load_tokenizer(spec)
    base = load_model(spec, "causal_lm", None, tokenizer)
    pair, single = differing_pair(base, CELL)
    prompts = [tokenizer(t)["input_ids"] for t in ["a short one", "a much longer prompt here"]]
    return pair.eval(), single.eval(), prompts, base


def test_fused_trials_sample_as_alone(models):
    pair, single, prompts, _ = models
    fused = sample_completions(pair, prompts, seeds=[5, 7], eos_id=None, **SAMPLING)
    rows = len(prompts) * GROUP
    assert fused.completion_ids.shape == (2 * rows, NEW)
    alone = sample_completions(single, prompts, seeds=[7], eos_id=None, **SAMPLING)
    assert torch.equal(fused.input_ids[rows:], alone.input_ids)
    assert torch.equal(fused.attention_mask[rows:], alone.attention_mask)
    again = sample_completions(pair, prompts, seeds=[5, 7], eos_id=None, **SAMPLING)
    assert torch.equal(again.input_ids, fused.input_ids)  # seeded
    group = fused.completion_ids[:GROUP]  # one prompt's completions differ from each other
    assert not torch.equal(group[0], group[1])
    other = sample_completions(single, prompts, seeds=[8], eos_id=None, **SAMPLING)
    assert not torch.equal(other.input_ids, alone.input_ids)


def test_cached_decoding_samples_what_a_full_forward_gives(models):
    """Replaying the race's noise over the logits of one full forward (no KV cache) picks every
    token that `generate` picked step by step from its cache: fused, with left-padded prompts,
    and whatever logit processing the model's own generation config asks for."""
    pair = copy.deepcopy(models[0])
    with torch.no_grad():  # peaked logits: rows repeat their likeliest tokens
        pair.lm_head.weight.mul_(30)
    pair.generation_config.repetition_penalty = 3.0
    pair.generation_config.no_repeat_ngram_size = 1
    new = 24
    batch = sample_completions(pair, models[2], seeds=[5, 7], eos_id=None,
                               **{**SAMPLING, "max_new_tokens": new})
    mask = batch.attention_mask
    with torch.no_grad():
        logits = pair(input_ids=batch.input_ids, attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -new - 1:-1]
    replay = TrialGumbel([5, 7], SAMPLING["temperature"])
    picks = torch.stack([replay(batch.input_ids, logits[:, t]).argmax(-1) for t in range(new)], 1)
    assert torch.equal(picks, batch.completion_ids)
    assert any(len(set(row.tolist())) < new for row in picks)  # repeats a penalty would change


def test_completion_ends_at_first_eos(models):
    _, single, prompts, _ = models
    free = sample_completions(single, prompts, seeds=[3], eos_id=None, **SAMPLING)
    eos = int(free.completion_ids[0, 2])  # a token the first row samples third
    ended = sample_completions(single, prompts, seeds=[3], eos_id=eos, **SAMPLING)
    mask = ended.completion_mask
    first = (free.completion_ids[0] == eos).nonzero()[0, 0]
    assert mask[0, :first + 1].all() and not mask[0, first + 1:].any()
    for row, ids in zip(mask, free.completion_ids, strict=True):
        hits = (ids == eos).nonzero()
        length = NEW if len(hits) == 0 else int(hits[0, 0]) + 1
        assert row.tolist() == [1] * length + [0] * (NEW - length)
    assert torch.equal(ended.attention_mask[:, -NEW:], mask)


def gpt2() -> torch.nn.Module:
    """A tiny GPT-2: absolute position embeddings, so a row's positions must count from its
    first real token (under RoPE a shift of every position changes nothing)."""
    config = AutoConfig.for_model(model_type="gpt2", n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, vocab_size=31000)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_row_scores_as_unpadded(models, arch):
    _, single, prompts, _ = models
    model = single if arch == "llama" else gpt2()
    batch = sample_completions(model, prompts, seeds=[1], eos_id=None, **SAMPLING)
    logps = completion_logps(model, batch, temperature=0.7)
    row = 0  # the short prompt, padded on the left
    real = batch.attention_mask[row].bool()
    assert not real.all()
    unpadded = Completions(batch.input_ids[row:row + 1, real],
                           batch.attention_mask[row:row + 1, real],
                           batch.completion_mask[row:row + 1])
    alone = completion_logps(model, unpadded, temperature=0.7)
    assert (alone - logps[row]).abs().max() < 1e-5


def whole_step(base: torch.nn.Module, prompts: list[list[int]], lrs: list[float],
               seeds: list[int]) -> list[dict[str, torch.Tensor]]:
    """One RL step from sampling on: K = len(lrs) trials sample (one seed each), a stand-in
    verifier scores, advantages, the base's log-probs for the KL, the loss and AdamW; each
    trial's weights after it."""
    k = len(lrs)
    trials = [TrialSpec(grid_id=i, cell=CELL, lr=lr, seed=0) for i, lr in enumerate(lrs)]
    model, attached = attach_trials(base, trials)
    with torch.no_grad():  # B != 0, so the trials' policies differ from the base
        for params in attached.trial_params:
            for name, param in params:
                if name.endswith("lora_B"):
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    completions = sample_completions(model, prompts, seeds=seeds, eos_id=None, **SAMPLING)
    rewards = (completions.completion_ids % 2 == 0).float().mean(1).round()  # stand-in verifier
    objective = Objective(max_new_tokens=NEW, beta=0.04, temperature=SAMPLING["temperature"])
    with torch.no_grad():
        ref = completion_logps(base, completions, objective.temperature)
    rollout = Rollout(completions, group_advantages(rewards, GROUP, k), ref_logps=ref)
    optimizer = build_optimizer(get_method("lora"), attached, trials, TrainSpec(steps=1))
    policy_losses(model, rollout, k, objective).sum().backward()
    optimizer.step()
    return [{name: p.detach().clone() for name, p in params} for params in attached.trial_params]


def test_fused_rl_step_from_sampling_is_each_trial_alone(models):
    """Sampling included, a K = 2 step leaves each trial where its step alone leaves it (to
    rounding: the frozen base multiplies K x the rows at once)."""
    base, prompts = models[3], models[2]
    fused = whole_step(base, prompts, [1e-2, 3e-2], [5, 7])
    for lr, seed, together in zip([1e-2, 3e-2], [5, 7], fused, strict=True):
        (alone,) = whole_step(base, prompts, [lr], [seed])
        for name, param in alone.items():
            assert float((together[name] - param).norm() / param.norm()) < 1e-6, name
