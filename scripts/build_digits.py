"""Build the built-in offline image datasets "digits-0-4" and "digits-5-9".

Why
---
The vision demo needs images that ship with lorasweep (no hub) and a base model that has
something to adapt: a tiny ViT is pretrained on digits 0-4 (``build_digits_base.py``) and then
tuned on digits 5-9. scikit-learn bundles the 8x8 handwritten digits of the UCI "Optical
Recognition of Handwritten Digits" set (1,797 images); they are small enough to store in the
repository as PNG bytes in parquet, so lorasweep needs no scikit-learn at run time.

How
---
1. Read the images with ``sklearn.datasets.load_digits`` (16 grey levels, 0-16) and scale them
   to 8-bit grey (0-255).
2. For each digit, with a fixed seed, put TEST_FRACTION of its images in the test split, the
   rest in train.
3. Write each half (digits 0-4 and 5-9) as ``train.parquet`` and ``test.parquet``: an ``image``
   column (PNG bytes, an ``Image`` feature of ``datasets``) and a ``label`` column (the digit as
   text), each split in a seeded shuffled order.

Re-running with the pinned packages gives byte-identical files (``tests/test_vision_demo.py``
checks it).

Usage::

    python scripts/build_digits.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

SEED = 20261203
TEST_FRACTION = 0.2
HALVES = {"0-4": range(0, 5), "5-9": range(5, 10)}
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "lorasweep" / "data" / "digits"
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})


def png(pixels: np.ndarray) -> bytes:
    """One 8x8 image of 0-16 grey levels as an 8-bit greyscale PNG."""
    buffer = io.BytesIO()
    grey = np.rint(pixels * (255 / 16)).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def split_rows(images: np.ndarray, targets: np.ndarray, digits: range,
               rng: np.random.Generator) -> dict[str, list[dict]]:
    """The half's train and test rows: TEST_FRACTION of each digit to test, both shuffled."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for digit in digits:
        index = rng.permutation(np.flatnonzero(targets == digit))
        n_test = round(len(index) * TEST_FRACTION)
        for name, part in (("test", index[:n_test]), ("train", index[n_test:])):
            splits[name] += [{"image": {"bytes": png(images[i]), "path": None},
                              "label": str(digit)} for i in part]
    return {name: [rows[i] for i in rng.permutation(len(rows))]
            for name, rows in splits.items()}


def build(out_dir: Path) -> None:
    from sklearn.datasets import load_digits  # build time only: the files ship built

    digits = load_digits()
    rng = np.random.default_rng(SEED)
    for half, classes in HALVES.items():
        folder = out_dir / half
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in split_rows(digits.images, digits.target, classes, rng).items():
            data = datasets.Dataset.from_list(rows, features=FEATURES)
            data.to_parquet(str(folder / f"{name}.parquet"))
            print(f"digits-{half} {name}: {len(rows)} images")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR,
                        help=f"where the digits-0-4 and digits-5-9 folders go (default {OUT_DIR})")
    build(parser.parse_args().out)
