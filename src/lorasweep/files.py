"""Files written whole or not at all: several workers may write one study folder at once."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A write that failed for lack of space (or of file size or quota) is the disk's fault, not the
# data's: it stops the command with one line instead of failing a trial.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS

PROBE_BYTES = 4096  # one file-system block


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside `path`, renamed onto it when the block succeeds."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_text(path: Path, text: str) -> None:
    """Append `text` whole or not at all: a write that fails half-way (a full disk) is cut back,
    so the file never keeps a partial line."""
    with open(path, "ab") as handle:
        length = handle.tell()
        try:
            handle.write(text.encode("utf-8"))
            handle.flush()
        except OSError:
            handle.truncate(length)
            raise


def check_writable(folder: Path) -> None:
    """Raise OSError unless a block of real bytes can be written in `folder` (an empty file can
    be created on a full disk, so that probe would pass)."""
    probe = folder / ".write-test"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        if probe.exists():
            probe.unlink()
