"""Math word problems (GSM8K, MetaMathQA-style data), scored by greedy generation.

Each generated solution is reduced to a number two ways: the strict rule takes the number after
`#### ` (GSM8K's answer format, which training teaches), the flexible rule the last number in the
text. Numbers compare as exact fractions after removing `$`, thousands commas and a trailing
period, so `1,000`, `$1000.00` and `1000` are equal. Optima are chosen on `accuracy_flexible`
unless `task.metric` says otherwise: a model that states the right number without the format
has solved the problem; the strict accuracy is recorded beside it (and shows whether the format
was learned).
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorasweep.config import Study, TaskSpec
from lorasweep.errors import StudyError
from lorasweep.tasks.causal_lm import CausalLMTask
from lorasweep.tasks.data import RawSplits, Records, require_field
from lorasweep.tasks.instruction import (
    PromptSplit,
    format_prompt,
    generate,
    tokenize_pairs,
    uses_chat_template,
)

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
STRICT = re.compile(r"####\s*(" + NUMBER + ")")
FLEXIBLE = re.compile(NUMBER)
PLAIN_PROMPT = "Question: {}\nAnswer: "  # without a chat template


def extract_strict(text: str) -> str | None:
    """The number after the first `#### `, or None."""
    match = STRICT.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text, or None."""
    found = FLEXIBLE.findall(text)
    return found[-1] if found else None


def normalize_number(text: str | None) -> Fraction | None:
    """An exact value for a number as written (`$1,000.50`, `-3`, `.5`, `7.`), or None.

    Only what the extractors can read counts (NUMBER): a gold answer written otherwise (`1/2`,
    `1e5`) is one no completion could match, and an exponent such as `1e99999999` would make
    Fraction build a hundred-million-digit integer."""
    if text is None:
        return None
    written = text.strip().rstrip(".,")
    if not re.fullmatch(NUMBER, written):
        return None
    return Fraction(written.replace("$", "").replace(",", ""))


def question_prompt(question: str, templated: bool) -> str:
    """The question as the model is asked it: as it is inside a chat template, else framed as
    "Question: ... Answer: " for a plain model to continue."""
    return question if templated else PLAIN_PROMPT.format(question)


def is_correct(predicted: str | None, gold: str) -> bool:
    value = normalize_number(predicted)
    return value is not None and value == normalize_number(gold)


def score(texts: list[str], golds: list[str]) -> dict[str, float]:
    """Strict and flexible accuracy of generated solutions against gold answers."""
    n = max(len(golds), 1)
    strict = sum(is_correct(extract_strict(t), g) for t, g in zip(texts, golds, strict=True))
    flexible = sum(is_correct(extract_flexible(t), g) for t, g in zip(texts, golds, strict=True))
    return {"accuracy_strict": strict / n, "accuracy_flexible": flexible / n}


class MathTask(CausalLMTask):
    """Reports eval_loss, accuracy_strict and accuracy_flexible."""

    def __init__(self, train: PromptSplit, validation: PromptSplit, test: PromptSplit | None,
                 tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> None:
        super().__init__(train, validation, test)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: PromptSplit, k: int, batch_size: int,
                 device: torch.device) -> list[dict]:
        """Response loss (teacher-forced) and both accuracies of greedy solutions, per trial."""
        losses = super().evaluate(model, split, k, batch_size, device)
        texts = generate(model, split.prompts, k, batch_size, device, self.tokenizer,
                         self.max_new_tokens)
        return [{**loss, **score([s[0] for s in trial], split.references)}
                for loss, trial in zip(losses, texts, strict=True)]


def gold_answer(record: dict, spec: TaskSpec, where: str) -> str:
    """The reference number: `answer_field`, else the response's `#### N` (else last number);
    `where` names the record in an error ("row 3 of the training data")."""
    if spec.answer_field is not None:
        return str(record[spec.answer_field])
    response = str(record[spec.response_field])
    found = extract_strict(response) or extract_flexible(response)
    if normalize_number(found) is None:
        raise StudyError(f"task.response_field: {where} has no number to score against "
                         "(no '#### N' and no number); set task.answer_field")
    return found


def build_math(study: Study, raw: RawSplits, tokenizer: PreTrainedTokenizerBase,
               seq_len: int) -> MathTask:
    spec = study.task
    for name in (spec.prompt_field, spec.response_field, spec.answer_field):
        if name is not None:
            require_field(raw, name, "task.prompt_field/response_field/answer_field")
    templated = uses_chat_template(tokenizer, spec.chat_template)

    def tokenize(records: Records, split: str) -> PromptSplit:
        prompts = [format_prompt(tokenizer, question_prompt(str(r[spec.prompt_field]), templated),
                                 templated) for r in records]
        responses = [str(r[spec.response_field]) for r in records]
        golds = [gold_answer(r, spec, raw.where(split, i)) for i, r in enumerate(records)]
        return tokenize_pairs(tokenizer, prompts, responses, golds, seq_len, spec.loss_on,
                              templated)

    test = None if raw.test is None else tokenize(raw.test, "test")
    return MathTask(tokenize(raw.train, "training"), tokenize(raw.validation, "validation"), test,
                    tokenizer, spec.max_new_tokens)
