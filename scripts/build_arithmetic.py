"""Build the built-in offline prompt set "arithmetic": one-step word problems with numeric answers.

Why
---
The RL demo (`lorasweep run rl`) needs prompts a small packaged model can solve some of the time:
a reward of 0 for every completion gives GRPO nothing to learn from (all advantages are 0), and
SmolLM2-135M-Instruct solves almost no GSM8K problem. One-step problems about everyday things
(add, take away, multiply) in GSM8K's style are solved part of the time, so the reward has room
to rise. The problems are written here from templates; nothing is copied from a dataset.

How
---
For each problem a seeded generator picks a template, a name and the numbers; the answer is
computed, never written by hand. The train and test splits are drawn from separate streams of
the same seed and no question appears in both.

Usage::

    python scripts/build_arithmetic.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261203
SIZES = {"train": 400, "test": 100}
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon",
         "Kemal", "Lena", "Mia", "Noah", "Olga", "Priya"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "stamps"]


def problem(rng: random.Random) -> dict:
    """One question and its answer (as text), from a random template."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "take", "times", "share"])
    if kind == "add":
        a, b = rng.randint(3, 40), rng.randint(3, 40)
        text, answer = (f"{name} has {a} {item}. {name} gets {b} more. How many {item} does "
                        f"{name} have now?"), a + b
    elif kind == "take":
        a = rng.randint(10, 50)
        b = rng.randint(2, a - 1)
        text, answer = (f"{name} had {a} {item} and gave {b} of them away. How many {item} "
                        f"does {name} have left?"), a - b
    elif kind == "times":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, answer = (f"{name} has {a} bags with {b} {item} in each bag. How many {item} "
                        f"does {name} have in all?"), a * b
    else:
        b, answer = rng.randint(2, 6), rng.randint(2, 9)
        text = (f"{name} shares {b * answer} {item} equally among {b} friends. How many {item} "
                "does each friend get?")
    return {"question": text, "answer": str(answer)}


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for offset, (split, size) in enumerate(SIZES.items()):
        rng = random.Random(SEED + offset)
        rows: list[dict] = []
        while len(rows) < size:
            row = problem(rng)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "src" / "lorasweep" / "data" / "arithmetic"
    parser.add_argument("--out", type=Path, default=default)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
