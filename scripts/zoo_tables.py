"""Write the zoo tables the docs show from the tests that compute them: what lorasweep does with
each image classifier transformers builds (tests/test_vision_zoo.py: a table in docs/images.md,
a list in README.md), and the parts it finds in each image-text-to-text model
(tests/test_vision_language.py: a table in docs/vision-language.md). Each test fails while its
text differs. Run: .venv/bin/python scripts/zoo_tables.py"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import test_vision_language, test_vision_zoo  # noqa: E402


def main() -> None:
    for zoo in (test_vision_zoo, test_vision_language):
        for name, write in zoo.WRITTEN.items():
            path = ROOT / name
            text = path.read_text()
            start, stop = text.index(zoo.BEGIN) + len(zoo.BEGIN), text.index(zoo.END)
            path.write_text(text[:start] + write() + text[stop:])
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
