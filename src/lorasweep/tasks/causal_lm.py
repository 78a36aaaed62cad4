"""Causal language modelling: next-token loss on all tokens or on response tokens only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from lorasweep.config import Study, TaskSpec
from lorasweep.errors import StudyError
from lorasweep.tasks.base import IGNORE, Task, TokenSplit, per_trial
from lorasweep.tasks.chat import tokenize_conversations
from lorasweep.tasks.data import RawSplits, Records, require_field


class CausalLMTask(Task):
    """Reports eval_loss, the mean next-token loss on the scored tokens."""

    def _token_losses(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss per trial (K,) and the mask of scored positions (b, T-1)."""
        targets = labels[:, 1:]
        flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        per_token = F.cross_entropy(flat, targets.repeat(k, 1).reshape(-1),
                                    ignore_index=IGNORE, reduction="none")
        return per_trial(per_token, k), targets != IGNORE

    def trial_losses(self, logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        total, mask = self._token_losses(logits, labels, k)
        return total / mask.sum().clamp(min=1)

    def loss_count(self, labels: torch.Tensor) -> int:
        return int((labels[:, 1:] != IGNORE).sum())

    def eval_terms(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, int, torch.Tensor]:
        total, mask = self._token_losses(logits, labels, k)
        return total, int(mask.sum()), torch.zeros(k)

    def summarize(self, loss_sum: torch.Tensor, count: int, correct: torch.Tensor) -> list[dict]:
        out = []
        for loss in loss_sum:
            mean = float(loss) / max(count, 1)
            out.append({"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))})
        return out


def build_causal_lm(study: Study, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
                    seq_len: int) -> CausalLMTask:
    """Next-token data: whole conversations (task.messages_field), prompt/response pairs, or
    plain text."""
    spec = study.task
    if spec.messages_field is not None:
        return _build_chat_lm(spec, raw, tokenizer, seq_len)
    paired = spec.prompt_field is not None and spec.response_field is not None
    fields = [spec.prompt_field, spec.response_field] if paired else [spec.text_field]
    for field in fields:
        require_field(raw, field, "task.prompt_field/response_field" if paired
                      else "task.text_field")

    def tokenize(records: Records, split: str) -> TokenSplit:
        records = [r for r in records if any(str(r[f]).strip() for f in fields)]
        if not records:
            raise StudyError(f"task.{'/'.join(fields)}: the {split} data has no text (every "
                             "record is blank)")
        if paired:
            prompts = [str(r[spec.prompt_field]) for r in records]
            texts = [p + str(r[spec.response_field]) for p, r in zip(prompts, records, strict=True)]
        else:
            texts = [str(r[spec.text_field]) for r in records]
        enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length",
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE)
        if paired and spec.loss_on == "response":
            prompt_lens = [len(tokenizer(p, add_special_tokens=True)["input_ids"])
                           for p in prompts]
            for row, n in enumerate(prompt_lens):
                labels[row, :n] = IGNORE
        return TokenSplit(enc["input_ids"], enc["attention_mask"], labels)

    test = None if raw.test is None else tokenize(raw.test, "test")
    return CausalLMTask(tokenize(raw.train, "training"), tokenize(raw.validation, "validation"),
                        test)


def _build_chat_lm(spec: TaskSpec, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
                   seq_len: int) -> CausalLMTask:
    """A causal_lm task on whole conversations (rows already checked by chat.row_checker)."""
    test = None if raw.test is None else tokenize_conversations(tokenizer, raw.test, spec,
                                                                seq_len, "test")
    return CausalLMTask(tokenize_conversations(tokenizer, raw.train, spec, seq_len, "training"),
                        tokenize_conversations(tokenizer, raw.validation, spec, seq_len,
                                               "validation"), test)
