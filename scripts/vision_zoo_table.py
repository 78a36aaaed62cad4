"""Write what lorasweep does with each image classifier transformers builds (a table in
docs/images.md, a list in README.md) from tests/test_vision_zoo.py's verdicts; that test fails
while they differ. Run: .venv/bin/python scripts/vision_zoo_table.py"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_vision_zoo import BEGIN, END, WRITTEN  # noqa: E402


def main() -> None:
    for name, write in WRITTEN.items():
        path = ROOT / name
        text = path.read_text()
        start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
        path.write_text(text[:start] + write() + text[stop:])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
