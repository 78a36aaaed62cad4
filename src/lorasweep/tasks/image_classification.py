"""Image classification: a transformers image classifier (ViT, DeiT, ConvNeXt, ...) trained with
cross-entropy and scored by accuracy and eval loss, exactly as text classification is
(ClassificationTask); only the inputs differ.

Each image is decoded once, converted to RGB (a grayscale, palette or RGBA image in an RGB set
is converted, as transformers' own examples do) and turned into pixel values by the model's
image processor. A split's input is then `pixel_values`, so training, curvature and the memory
probes need nothing image-specific. An image that cannot be read or preprocessed, a label the
training data lacks, or images the model cannot take are one line naming the file or row.
"""

from __future__ import annotations

import io
from functools import partial

import torch
from PIL import Image
from torch import nn
from transformers.image_processing_utils import BaseImageProcessor

from lorasweep.config import Study
from lorasweep.errors import StudyError, first_line
from lorasweep.tasks.base import OffTheRows, Split, layers_off_the_rows, logits_of
from lorasweep.tasks.classification import ClassificationTask, labelled_classes
from lorasweep.tasks.data import RawSplits, Records

# What PIL raises for a file that is not an image, is cut short or is damaged.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageClassificationTask(ClassificationTask):
    """Reports eval_loss and accuracy; checks that the model takes its images."""

    def __init__(self, train: Split, validation: Split, test: Split | None,
                 label_names: list[str], first: str) -> None:
        super().__init__(train, validation, test, label_names)
        self.first = first  # the first validation image's place, for the error below

    @torch.no_grad()
    def check_model(self, model: nn.Module) -> None:
        """One forward pass on one validation image: images of a size the model cannot take
        fail here, before any trial is claimed, not in every trial."""
        batch = self.validation.batch(torch.arange(1), 1)
        try:
            logits_of(model, batch)
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            # a model that wants text as well (a VLM, ImageGPT's color tokens), or gives no
            # logits, is not an image classifier to lorasweep; anything else is the image size
            if not isinstance(exc, TypeError | AttributeError) and "input_ids" not in str(exc):
                size = "x".join(map(str, batch["pixel_values"].shape[-2:]))
                raise StudyError(f"task.image_field: {self.first}: the model cannot take "
                                 f"images of {size} pixels after its image processor "
                                 f"({first_line(exc)})") from None
            raise StudyError(f"model.source: {type(model).__name__} does not classify pixel "
                             f"values alone, as image classification feeds it "
                             f"({first_line(exc)})") from None


    def layers_off_the_rows(self, model: nn.Module, layers: tuple[type, ...]) -> OffTheRows:
        return layers_off_the_rows(
            model, lambda rows: self.validation.batch(torch.zeros(rows, dtype=torch.long), 1),
            layers)


def build_image_classification(study: Study, raw: RawSplits, processor: BaseImageProcessor,
                               seq_len: int) -> ImageClassificationTask:
    """Pixel values and class ids of each split (`seq_len` does not apply to images)."""
    spec = study.task
    classes = labelled_classes(raw, spec, spec.image_field, "task.image_field")

    where = partial(image_place, raw, spec.image_field)

    def preprocess(records: Records, split: str, shape: torch.Size | None = None) -> Split:
        """The split's pixel values, all of one shape: `shape` (the training images'), else
        the first image's."""
        place = partial(where, records, split)
        labels = classes.ids(records, place)
        pixels = [_pixel_values(processor, record[spec.image_field], place(i))
                  for i, record in enumerate(records)]
        shape = shape or pixels[0].shape
        for i, value in enumerate(pixels):
            if value.shape != shape:
                raise StudyError(f"task.image_field: {place(i)} becomes pixel values of shape "
                                 f"{tuple(value.shape)}, the training images {tuple(shape)}: "
                                 "the model's image processor does not resize to one size")
        return Split({"pixel_values": torch.stack(pixels)}, labels)

    train = preprocess(raw.train, "training")
    shape = train.inputs["pixel_values"].shape[1:]
    test = None if raw.test is None else preprocess(raw.test, "test", shape)
    return ImageClassificationTask(train, preprocess(raw.validation, "validation", shape), test,
                                   classes.names, where(raw.validation, "validation", 0))


def image_place(raw: RawSplits, field: str, records: Records, split: str, index: int) -> str:
    """Where an image is: the row as stored, and its file when the image is one (every image
    kind's errors name it so)."""
    value = records[index][field]
    path = value.get("path") if isinstance(value, dict) else value
    file = f"{path} (" if isinstance(path, str) and path else ""
    return f"{file}{raw.where(split, index)}{')' if file else ''}"


def read_rgb(value: object, place: str) -> Image.Image:
    """One image decoded and converted to RGB; one that cannot be read is one line naming its
    place."""
    try:
        return _open(value).convert("RGB")
    except UNREADABLE as exc:
        raise StudyError(f"task.image_field: {place} cannot be read as an image "
                         f"({first_line(exc)})") from None


def _pixel_values(processor: BaseImageProcessor, value: object, place: str) -> torch.Tensor:
    """One image's pixel values (C, H, W) as the model's processor makes them."""
    image = read_rgb(value, place)
    try:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]
    except (ValueError, RuntimeError) as exc:
        raise StudyError(f"task.image_field: {place}: the model's image processor cannot take "
                         f"this {image.width}x{image.height} image ({first_line(exc)})") from None


def _open(value: object) -> Image.Image:
    """An image as `datasets` stores one (decoded, or bytes and path), a path, or bytes."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    raise ValueError(f"a {type(value).__name__}, not an image, its path or its bytes")

