"""G sampled completions per prompt from each of K fused policies, in one `generate` call.

Rows are laid out as training lays them (methods/stacked.py): trial 0's rows, then trial 1's, ...;
within a trial, each prompt's G completions are consecutive (the groups whose rewards are
normalized together, tasks/grpo.py). The KV cache works across the K blocks because every stacked
layer splits each decoding step's rows the same way.

Sampling is Gumbel-max (the exponential race): each trial adds noise from its own generator to its
block's logits / temperature and the argmax is taken, an exact sample of softmax(logits /
temperature) with nothing cut off (no top-k, no top-p), so the log-probs the loss takes are those
of the sampler. A trial's samples are the same alone or fused; torch's multinomial over the
whole batch would give trial k different numbers in groups of different size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lorasweep.tasks.instruction import left_padded


@dataclass
class Completions:
    """Prompts (left-padded) followed by their sampled completions (right-padded)."""

    input_ids: torch.Tensor  # (rows, P + C)
    attention_mask: torch.Tensor  # (rows, P + C)
    completion_mask: torch.Tensor  # (rows, C): 1 up to and including the first eos

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, -self.completion_mask.shape[1]:]


class TrialGumbel(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature`, each trial's block of rows drawing
    from its own seeded generator."""

    def __init__(self, seeds: list[int], temperature: float) -> None:
        self.seeds = seeds
        self.temperature = temperature
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        if not self.generators:  # on the device the scores are on, from the first step
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        blocks = []
        for block, generator in zip(scores.float().chunk(len(self.seeds)), self.generators,
                                    strict=True):
            race = torch.empty_like(block).exponential_(generator=generator)
            blocks.append(block / self.temperature - race.log())
        return torch.cat(blocks)


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[list[int]], group_size: int,
                       seeds: list[int], temperature: float, max_new_tokens: int, pad_id: int,
                       eos_id: int | None) -> Completions:
    """`group_size` completions of every prompt from each trial (one seed per trial: K =
    len(seeds)), each ending at its first eos or after `max_new_tokens`; on the model's device,
    where the loss takes them."""
    k = len(seeds)
    ids, mask = left_padded([p for p in prompts for _ in range(group_size)], pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.repeat(k, 1).to(device), mask.repeat(k, 1).to(device)
    # a model's own generation config fills every value left unset here: the ones that would
    # reshape the logits before the race (instruct models often ship a repetition_penalty) are
    # set neutral
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              repetition_penalty=1.0, no_repeat_ngram_size=0,
                              pad_token_id=pad_id, eos_token_id=eos_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                         logits_processor=LogitsProcessorList([TrialGumbel(seeds, temperature)]))
    new = out[:, ids.shape[1]:]
    completion_mask = torch.ones_like(new)
    if eos_id is not None:
        ended = (new == eos_id).long()
        completion_mask = ((ended.cumsum(1) - ended) == 0).long()  # no eos before this token
    return Completions(torch.cat([ids, new], 1), torch.cat([mask, completion_mask], 1),
                       completion_mask)
