"""Image-text chat: a vision-language model (LLaVA, Qwen2-VL, Idefics3/SmolVLM, ...) trained on
conversations in TRL's format, with the loss on the assistant's tokens only (or on every text
token with `loss_on: all`), as TRL's SFTTrainer trains one.

A row holds `messages` (turns whose content is text, or a list of {"type": "image"} and
{"type": "text", "text": ...} entries) and `images` (the row's images, in the order of its image
entries). The model's own processor renders each conversation with its chat template and
expands every image entry into the image tokens the model expects.

The assistant turns are located as tasks/chat.py locates them, by rendering prefixes of the
conversation; each piece is processed on its own, with the images its text holds, so the mask
is exact for the ids that train. The processor is then run once on the whole row, to check that
the pieces' ids are the whole's. A row's image inputs are made again when a batch takes it (a
split keeps the images as stored), and a batch's are each row's laid end to end
(VisionLanguageSplit), so a fused group's K copies stay K blocks of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.processing_utils import ProcessorMixin

from lorasweep.config import Study, TaskSpec
from lorasweep.errors import StudyError, first_line
from lorasweep.tasks.base import IGNORE, OffTheRows, TokenSplit, layers_off_the_rows, logits_of
from lorasweep.tasks.causal_lm import CausalLMTask
from lorasweep.tasks.chat import pieces, render
from lorasweep.tasks.data import RawSplits, Records, RowCheck
from lorasweep.tasks.image_classification import read_rgb

SETTING = "task.messages_field"
Turns = list[dict]
Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Row:
    """What a row's image inputs are made from when a batch takes it: its rendered text, its
    images as the data stores them (encoded: a split of decoded pixel values would hold gigabytes
    for a real dataset), and its place, for errors."""

    text: str
    images: list
    where: str


class VisionLanguageSplit(TokenSplit):
    """Tokenized conversations, and each row's images, turned into the model's image inputs by
    its processor when a batch takes the row (as TRL's collator does). Their first dimension is
    images or patches, not rows, so a batch lays its rows' inputs end to end (pixel values of
    rows with fewer images or tiles padded with zeros, which the models skip)."""

    def __init__(self, tokens: Inputs, labels: torch.Tensor, rows: list[Row],
                 processor: ProcessorMixin) -> None:
        super().__init__(tokens["input_ids"], tokens["attention_mask"], labels)
        self.inputs.update(tokens)  # token-aligned extras (Qwen's mm_token_type_ids)
        self.rows = rows
        self.processor = processor

    def head(self, n: int) -> VisionLanguageSplit:
        part = super().head(n)
        assert isinstance(part, VisionLanguageSplit)
        part.rows = self.rows[:n]
        return part

    def batch(self, index: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        batch = super().batch(index, k)
        images = [image_inputs(self.processor, self.rows[int(i)]) for i in index]
        for name in dict.fromkeys(key for row in images for key in row):
            joined = _end_to_end([row[name] for row in images if name in row])
            batch[name] = joined if k == 1 else joined.repeat(k, *(1,) * (joined.ndim - 1))
        return batch


def image_inputs(processor: ProcessorMixin, row: Row) -> Inputs:
    """A row's image inputs as its processor makes them with the row's text: everything it
    gives but the token-aligned inputs (ids, masks, token types)."""
    if not row.images:
        return {}
    decoded = [read_rgb(v, f"{row.where}, image {i}") for i, v in enumerate(row.images)]
    whole = _processed(processor, row.text, decoded, row.where)
    return {name: t for name, t in whole.items() if not _token_aligned(t, whole)}


def _token_aligned(tensor: torch.Tensor, whole: Inputs) -> bool:
    return tensor.ndim == 2 and tensor.shape == whole["input_ids"].shape


def _end_to_end(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors joined along their first dimension, each zero-padded to the largest in the
    others (Idefics3's rows of different image counts, LLaVA-NeXT's of different tiles)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.ndim)) for p in (0, shape[d - 1] - t.shape[d])]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


class VisionLanguageTask(CausalLMTask):
    """Reports eval_loss, token_accuracy (TRL's mean token accuracy: the share of scored tokens
    the model predicts, teacher-forced) and exact_match (the share of examples whose every
    scored token it predicts: for one-word replies, whether the reply is right)."""

    def eval_terms(self, logits: torch.Tensor, labels: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, int, torch.Tensor]:
        total, mask = self._token_losses(logits, labels, k)
        hits = (logits[:, :-1].argmax(-1).reshape(k, *mask.shape) == labels[:, 1:]) | ~mask
        tokens = (hits & mask).flatten(1).sum(1)
        scored = mask.any(1)
        examples = (hits.all(2) & scored).sum(1)
        counts = torch.stack([tokens, examples, scored.sum().expand(k)], dim=1)
        return total, int(mask.sum()), counts

    def summarize(self, loss_sum: torch.Tensor, count: int, correct: torch.Tensor) -> list[dict]:
        out = super().summarize(loss_sum, count, correct)
        for metrics, (tokens, examples, scored) in zip(out, correct.tolist(), strict=True):
            metrics["token_accuracy"] = tokens / max(count, 1)
            metrics["exact_match"] = examples / max(scored, 1)
        return out

    def _probe_batch(self, rows: int) -> dict[str, torch.Tensor]:
        """`rows` copies of the first validation row that has images (else row 0)."""
        assert isinstance(self.validation, VisionLanguageSplit)
        first = next((i for i, row in enumerate(self.validation.rows) if row.images), 0)
        return self.validation.batch(torch.full((rows,), first, dtype=torch.long), 1)

    @torch.no_grad()
    def check_model(self, model: nn.Module) -> None:
        """One forward on a validation row with its images: a processor that does not fit its
        model fails here, before any trial is claimed."""
        try:
            logits_of(model, self._probe_batch(1))
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise StudyError(f"model.source: {type(model).__name__} does not take its "
                             f"processor's inputs ({first_line(exc)})") from None

    def layers_off_the_rows(self, model: nn.Module, layers: tuple[type, ...]) -> OffTheRows:
        return layers_off_the_rows(model, self._probe_batch, layers)


def row_checker(spec: TaskSpec, processor: ProcessorMixin) -> RowCheck:
    """The check of each row a study uses: well-formed turns, as many images as image entries,
    each image readable, a rendering the chat template accepts and (with `loss_on: assistant`)
    assistant turns it can locate."""
    if not getattr(processor, "chat_template", None):
        raise StudyError(f"{SETTING}: the model's processor has no chat template; give it one "
                         "(chat_template.jinja beside its processor_config.json)")

    def check(records: Records, numbers: Sequence[int], source: str) -> None:
        for number in numbers:
            where = f"row {number} of the {source} data"
            turns, images = conversation(records[number], spec, where)
            for i, image in enumerate(images):
                read_rgb(image, f"{where}, image {i}")
            if spec.loss_on == "assistant":
                pieces(processor, turns, where)
            else:
                render(processor, turns, where)

    return check


def conversation(record: dict, spec: TaskSpec, where: str) -> tuple[Turns, list]:
    """The row's turns, with every content a list of image and text entries, and its images."""
    field = spec.messages_field
    assert field is not None
    for name in (field, spec.image_field):
        if name not in record:
            setting = SETTING if name == field else "task.image_field"
            raise StudyError(f"{setting}: {where} has no field '{name}'; fields: "
                             f"{', '.join(record)}")
    turns = record[field]
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) for t in turns):
        raise StudyError(f"{SETTING}: {where} is not a list of {{role, content}} turns")
    out = [{"role": t["role"], "content": _entries(t.get("content"), where)} for t in turns]
    if not any(t["role"] == "assistant" for t in out):
        raise StudyError(f"{SETTING}: {where} has no assistant turn")
    images = record[spec.image_field]
    images = [] if images is None else images if isinstance(images, list) else [images]
    wanted = sum(e["type"] == "image" for t in out for e in t["content"])
    if wanted != len(images):
        raise StudyError(f"task.image_field: {where} has {wanted} image "
                         f"entr{'y' if wanted == 1 else 'ies'} in its turns and "
                         f"{len(images)} image{'' if len(images) == 1 else 's'} in "
                         f"'{spec.image_field}'; they must match, in order")
    return out, images


def _entries(content: object, where: str) -> list[dict]:
    """A turn's content as entries: text stays text, images are {"type": "image"}."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        out = []
        for entry in content:
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind == "text" and isinstance(entry.get("text"), str):
                out.append({"type": "text", "text": entry["text"]})
            elif kind == "image":
                out.append({"type": "image"})
            else:
                break
        else:
            return out
    raise StudyError(f"{SETTING}: {where}: a turn's content is neither text nor a list of "
                     "{type: text, text} and {type: image} entries")


def _processed(processor: ProcessorMixin, text: str, images: list[Image.Image], where: str
               ) -> dict[str, torch.Tensor]:
    try:
        return dict(processor(text=[text], images=images or None, return_tensors="pt",
                              add_special_tokens=False))
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise StudyError(f"task.image_field: {where}: the model's processor cannot take this "
                         f"row ({first_line(exc)})") from None


def _image_token_ids(processor: ProcessorMixin) -> set[int]:
    """The ids a processor writes for images (never targets under `loss_on: all`)."""
    tokenizer = processor.tokenizer
    names = [getattr(processor, name, None) for name in dir(processor)
             if name.endswith("_token") and ("image" in name or "vision" in name)]
    ids = {tokenizer.convert_tokens_to_ids(t) for t in names if isinstance(t, str)}
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def tokenize_rows(processor: ProcessorMixin, records: Records, spec: TaskSpec, seq_len: int,
                  raw: RawSplits, split: str) -> VisionLanguageSplit:
    """Right-padded token rows cut at seq_len, labelled on the assistant turns (or every text
    token), and each row's image inputs. A row whose image tokens reach past seq_len is an
    error naming it: cutting there would leave the model images without their tokens."""
    tokenizer = processor.tokenizer
    image_ids = _image_token_ids(processor)
    image_token = getattr(processor, "image_token", None) or "<image>"
    tokens, labels, rows = [], [], []
    for number, record in enumerate(records):
        where = raw.where(split, number)
        turns, values = conversation(record, spec, where)
        decoded = [read_rgb(v, f"{where}, image {i}") for i, v in enumerate(values)]
        parts = ([(render(processor, turns, where), True)] if spec.loss_on == "all"
                 else pieces(processor, turns, where))
        ids, target, used, image_end = [], [], 0, 0
        for text, in_loss in parts:
            n = text.count(image_token)
            piece = _processed(processor, text, decoded[used:used + n], where)["input_ids"][0]
            used += n
            ids.append(piece)
            target.append(piece.masked_fill(torch.isin(piece, torch.tensor(sorted(image_ids))),
                                            IGNORE) if in_loss else torch.full_like(piece, IGNORE))
            image_end = sum(map(len, ids)) if n else image_end
        if used != len(decoded):
            raise StudyError(f"task.image_field: {where}: the chat template writes {used} image "
                             f"placeholder{'s' * (used != 1)} ('{image_token}') for its "
                             f"{len(decoded)} image{'s' * (len(decoded) != 1)}")
        row = Row("".join(t for t, _ in parts), values, where)
        whole = _processed(processor, row.text, decoded, where)
        joined = torch.cat(ids)
        if not torch.equal(whole["input_ids"][0], joined):
            raise StudyError(f"{SETTING}: {where}: the model's processor tokenizes the turns "
                             "differently from the whole conversation, so assistant turns "
                             "cannot be located; use task.loss_on: all")
        if image_end > seq_len:
            raise StudyError(f"train.seq_len: {where} has image tokens up to position "
                             f"{image_end}, past seq_len {seq_len}; raise train.seq_len")
        tokens.append({name: t[0, :seq_len] for name, t in whole.items()
                       if _token_aligned(t, whole)})
        labels.append(torch.cat(target)[:seq_len])
        rows.append(row)
    return VisionLanguageSplit(_padded(tokens, seq_len, tokenizer.pad_token_id),
                               _padded([{"labels": t} for t in labels], seq_len, IGNORE)["labels"],
                               rows, processor)


def _padded(rows: list[dict[str, torch.Tensor]], seq_len: int, pad: int) -> Inputs:
    """Each token-aligned input as (N, seq_len), padded on the right: ids with `pad`, every
    other input (masks, token types) with 0."""
    out = {}
    for name in rows[0]:
        fill = pad if name in ("input_ids", "labels") else 0
        table = torch.full((len(rows), seq_len), fill, dtype=rows[0][name].dtype)
        for i, row in enumerate(rows):
            table[i, :len(row[name])] = row[name]
        out[name] = table
    return out


def build_vision_language(study: Study, raw: RawSplits, processor: ProcessorMixin,
                          seq_len: int) -> VisionLanguageTask:
    """Each split's conversations as token rows and image inputs (rows checked by
    row_checker)."""
    spec = study.task

    def split(records: Records | None, name: str) -> VisionLanguageSplit | None:
        return None if records is None else tokenize_rows(processor, records, spec, seq_len,
                                                          raw, name)

    train, validation = split(raw.train, "training"), split(raw.validation, "validation")
    assert train is not None and validation is not None
    return VisionLanguageTask(train, validation, split(raw.test, "test"))
