"""Chat data in the messages format: each row a list of {role, content} turns (as TRL's
SFTTrainer stores it), rendered with the model's own chat template.

causal_lm trains on whole conversations, with the loss on every assistant turn (`loss_on:
assistant`) or on every token (`loss_on: all`). The kinds that read chat data as a pair
(kinds.Kind.messages: math and code) take each row's last assistant turn as the response and the
last user turn before it as the prompt, and go on as prompt/response data.

The assistant-token mask is computed by rendering prefixes of each conversation, not with
`return_assistant_tokens_mask`, which needs `{% generation %}` markers that most models' templates
lack: assistant turn i begins where the rendering of turns 0..i-1 with the generation prompt ends,
and ends where the rendering of turns 0..i ends. This needs only that a template renders a
conversation's first turns as the start of the whole (one that does not is a one-line error). A
row is tokenized piece by piece at these boundaries, so the mask is exact for the ids that train;
the pieces meet at the template's markup, and for the templates in the tests the ids equal
`apply_chat_template`'s for the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lorasweep.config import TaskSpec
from lorasweep.errors import StudyError
from lorasweep.kinds import kind_of
from lorasweep.tasks.base import IGNORE, TokenSplit
from lorasweep.tasks.data import RawSplits, Records, RowCheck

Turns = list[dict]
SETTING = "task.messages_field"


def row_checker(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> RowCheck:
    """The check (data.load_splits) of each row a study uses: well-formed turns with an
    assistant turn, a rendering the template accepts, assistant turns it can locate (with
    `loss_on: assistant`), and for a pair a user turn before the last assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise StudyError(f"{SETTING}: the model's tokenizer has no chat template; give it one "
                         "(chat_template in its tokenizer_config.json) or use "
                         "task.prompt_field/response_field")

    def check(records: Records, numbers: Sequence[int], source: str) -> None:
        for number in numbers:
            where = f"row {number} of the {source} data"
            turns = conversation(records[number], spec.messages_field, where)
            if kind_of(spec.kind).messages == "pair":
                render(tokenizer, turns, where)
                last_pair(turns, where)
            elif spec.loss_on == "assistant":
                pieces(tokenizer, turns, where)
            else:
                render(tokenizer, turns, where)

    return check


def conversation(record: dict, field: str, where: str) -> Turns:
    """The row's turns, checked: a list of {role, content} strings with an assistant turn."""
    if field not in record:
        raise StudyError(f"{SETTING}: {where} has no field '{field}'; fields: "
                         f"{', '.join(record)}")
    turns = record[field]
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str)
            and isinstance(t.get("content"), str) for t in turns):
        raise StudyError(f"{SETTING}: {where} is not a list of {{role, content}} turns")
    if not any(t["role"] == "assistant" for t in turns):
        raise StudyError(f"{SETTING}: {where} has no assistant turn")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def render(tokenizer: PreTrainedTokenizerBase, turns: Turns, where: str,
           generation_prompt: bool = False) -> str:
    """The template's text for these turns; a template error names the first turn it rejects."""
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # templates raise jinja2 errors of their own (raise_exception)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if not turns:
            raise StudyError(f"{SETTING}: {where}: the model's chat template cannot open an "
                             f"assistant turn at the start: {reason}") from None
        bad = next((i for i in range(len(turns)) if not _renders(tokenizer, turns[:i + 1])),
                   len(turns) - 1)
        raise StudyError(f"{SETTING}: {where}: the model's chat template rejects turn {bad} "
                         f"(role '{turns[bad]['role']}'): {reason}") from None


def _renders(tokenizer: PreTrainedTokenizerBase, turns: Turns) -> bool:
    try:
        tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # any template error: this prefix is rejected
        return False
    return True


def pieces(tokenizer: PreTrainedTokenizerBase, turns: Turns, where: str
           ) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is an assistant turn) pieces, in order."""
    full = render(tokenizer, turns, where)
    out, done = [], 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, turns[:i], where, generation_prompt=True)
        through = render(tokenizer, turns[:i + 1], where)
        if not (full.startswith(before) and full.startswith(through)) or len(before) < done:
            raise StudyError(f"{SETTING}: {where}: the model's chat template renders the first "
                             "turns of a conversation differently from the whole, so assistant "
                             "turns cannot be located; use task.loss_on: all")
        out += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    out.append((full[done:], False))
    return [(text, in_loss) for text, in_loss in out if text]


def tokenize_conversations(tokenizer: PreTrainedTokenizerBase, records: Records, spec: TaskSpec,
                           seq_len: int, split: str) -> TokenSplit:
    """Right-padded rendered conversations, cut at seq_len, labelled on assistant turns (or all).

    The template writes its own special tokens, so none are added."""
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(records), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(records), seq_len), dtype=torch.long)
    labels = torch.full((len(records), seq_len), IGNORE, dtype=torch.long)
    for row, record in enumerate(records):
        where = f"example {row} of the {split} split"  # rows were checked as stored
        turns = conversation(record, spec.messages_field, where)
        if spec.loss_on == "all":
            parts = [(render(tokenizer, turns, where), True)]
        else:
            parts = pieces(tokenizer, turns, where)
        ids, target = [], []
        for text, in_loss in parts:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            target += piece if in_loss else [IGNORE] * len(piece)
        n = min(len(ids), seq_len)
        input_ids[row, :n] = torch.tensor(ids[:n])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(target[:n])
    return TokenSplit(input_ids, mask, labels)


def last_pair(turns: Turns, where: str) -> tuple[str, str]:
    """(prompt, response) of a conversation: the last user turn before the last assistant turn,
    and that assistant turn."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    users = [t["content"] for t in turns[:last] if t["role"] == "user"]
    if not users:
        raise StudyError(f"{SETTING}: {where} has no user turn before its last assistant turn")
    return users[-1], turns[last]["content"]


def as_pairs(spec: TaskSpec, raw: RawSplits) -> tuple[TaskSpec, RawSplits]:
    """Chat data read as pairs (math, code): each row gains prompt and response fields (named after
    the messages field) from `last_pair`, and the spec names them."""
    prompt, response = f"{spec.messages_field}.prompt", f"{spec.messages_field}.response"

    def convert(records: Records, split: str) -> Records:
        out = []
        for number, record in enumerate(records):
            where = f"example {number} of the {split} split"  # rows were checked as stored
            pair = last_pair(conversation(record, spec.messages_field, where), where)
            out.append({**record, prompt: pair[0], response: pair[1]})
        return out

    paired = spec.model_copy(update={"prompt_field": prompt, "response_field": response,
                                     "loss_on": "all" if spec.loss_on == "all" else "response"})
    test = None if raw.test is None else convert(raw.test, "test")
    return paired, RawSplits(convert(raw.train, "training"),
                             convert(raw.validation, "validation"), test, raw.stored)
