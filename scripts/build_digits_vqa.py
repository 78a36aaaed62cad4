"""Build the built-in offline image-text chat datasets "digits-vqa-0-4" and "digits-vqa-5-9".

Why
---
The image-text demo (``lorasweep run vlm``) tunes an image-text chat model with nothing from the
hub. Its base, digits-vlm, is a LLaVA whose projector was aligned on digits 0-4 asked "Which
digit is this?" and answered with the digit's word ("three", ``build_digits_vlm.py``); it
ignores a request for the numeral and still answers the word. The demo teaches it that reply:
LoRA learns it in 15 steps of 8 at a good LR and not at a poor one, which a CPU can show in
minutes. (Naming digits 5-9, which the base's ViT never saw, takes far longer to learn.) The data
is the built-in digits (``build_digits.py``) asked as a chat, in TRL's vision-language format,
so that the same study runs on a user's own TRL data.

How
---
Each image of ``data/digits/{0-4,5-9}/{train,test}.parquet`` becomes one row, in the same order
and the same splits, with its PNG bytes unchanged:

- ``images``: a list of one image (an ``Image`` feature of ``datasets``: PNG bytes);
- ``messages``: the user's turn, the image then the question QUESTION, and the assistant's, the
  digit as a numeral ("7"); each turn's ``content`` is a list of ``{"type": "image"}`` and
  ``{"type": "text", "text": ...}`` entries.

Re-running gives byte-identical files (but for the writer's version in the parquet footer).

Usage::

    python scripts/build_digits_vqa.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import pyarrow.parquet as pq

DATA_DIR = Path(__file__).resolve().parent.parent / "src" / "lorasweep" / "data"
DIGITS_DIR = DATA_DIR / "digits"
OUT_DIR = DATA_DIR / "digits_vqa"
HALVES = ("0-4", "5-9")
SPLITS = ("train", "test")
QUESTION = "Which digit is this? Answer with a numeral."
_TEXT = datasets.Value("string")
FEATURES = datasets.Features({
    "images": datasets.List(datasets.Image()),
    "messages": datasets.List({"role": _TEXT, "content": datasets.List({"type": _TEXT,
                                                                       "text": _TEXT})}),
})


def chat_row(image: dict, label: str) -> dict:
    """One digit as a TRL vision-language row: the image, the question and its answer."""
    # An image entry has a null text: Arrow stores a list of entries of one shape.
    return {"images": [image],
            "messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                      {"type": "text", "text": QUESTION}]},
                         {"role": "assistant",
                          "content": [{"type": "text", "text": label}]}]}


def build(out_dir: Path, digits_dir: Path = DIGITS_DIR) -> None:
    for half in HALVES:
        folder = out_dir / half
        folder.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            # pyarrow, not datasets, reads the source: its PNG bytes pass through untouched.
            rows = pq.read_table(digits_dir / half / f"{split}.parquet").to_pylist()
            data = datasets.Dataset.from_list([chat_row(row["image"], row["label"])
                                               for row in rows], features=FEATURES)
            data.to_parquet(str(folder / f"{split}.parquet"))
            print(f"digits-vqa-{half} {split}: {len(rows)} rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR,
                        help=f"where the 0-4 and 5-9 folders go (default {OUT_DIR})")
    build(parser.parse_args().out)
