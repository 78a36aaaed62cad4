"""Opening a study's Optuna storage, and riding out the moments it cannot be reached.

The default storage is a journal file inside the study folder (one machine, or a shared file
system). `--storage postgresql://USER@HOST/DB` puts the study in a database that workers on many
machines share. A database restart or a network blip must not end a day-long sweep, so every
storage call goes through `patiently`, which retries transient errors for a while; errors that
waiting cannot fix (a full disk, a wrong password) become one clear line at once.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from lorasweep.errors import StudyError

JOURNAL_NAME = "optuna.journal"
DATABASE_SCHEMES = ("postgresql", "sqlite")
# File-system errors that may clear by themselves (NFS hiccups); the rest are the user's to fix.
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR}
# A database refusing us for good says so in these words; waiting will not change it.
PERMANENT_DB_WORDS = ("authentication failed", "does not exist", "no password supplied",
                      "permission denied")

T = TypeVar("T")


class SafeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file, except that a failed append (a full disk) is undone.

    Optuna appends records under its lock with one write; if that write fails half-way, the
    journal keeps a partial line and every later read of the study fails. Here the file is cut
    back to its length before the append, under the same lock, so what was recorded stays
    readable. (The append is re-stated rather than wrapped because Optuna's lock is not
    re-entrant and the truncation must happen while it is held.)
    """

    def append_logs(self, logs: list[dict]) -> None:
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        with get_lock_file(self._lock):
            length = os.path.getsize(self._file_path) if os.path.exists(self._file_path) else 0
            try:
                with open(self._file_path, "ab") as handle:
                    handle.write(text.encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError:
                with open(self._file_path, "r+b") as handle:
                    handle.truncate(length)
                raise


def open_storage(url: str | None, folder: Path, patience: float) -> BaseStorage:
    """The study's storage: the folder's journal file, or the database at `url`."""
    if url is None:
        path = folder / JOURNAL_NAME
        return patiently(lambda: JournalStorage(SafeJournalFileBackend(str(path))),
                         f"{path}", patience)
    check_storage_url(url)
    # pool_pre_ping replaces connections that a database restart closed, instead of failing once.
    return patiently(lambda: RDBStorage(url, engine_kwargs={"pool_pre_ping": True}),
                     f"--storage {public_url(url)}", patience)


def check_storage_url(url: str) -> None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in DATABASE_SCHEMES:
        raise StudyError(f"--storage {public_url(url)}: not a database URL; allowed: "
                         "postgresql://USER@HOST[:PORT]/DATABASE or sqlite:///FILE "
                         "(leave it out for the study folder's journal file)")


def public_url(url: str) -> str:
    """The URL without its password, safe to print and to write into the study folder.

    The database client finds the password in PGPASSWORD or ~/.pgpass when the URL has none.
    """
    try:
        # URL is a NamedTuple; its set() reads None as "keep", so the field is replaced directly
        return make_url(url)._replace(password=None).render_as_string(hide_password=False)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1]


def is_transient(exc: BaseException) -> bool:
    """Whether waiting may fix the error: a lost connection yes, a full disk no.

    Optuna re-raises some database errors as its own StorageInternalError: the cause decides.
    """
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        return is_transient(exc.__cause__)
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
                  | sqlalchemy.exc.DisconnectionError):
        message = str(exc).lower()
        return not any(words in message for words in PERMANENT_DB_WORDS)
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def patiently(call: Callable[[], T], what: str, patience: float) -> T:
    """Run a storage call, retrying transient errors with backoff for up to `patience` s."""
    first_failure = None
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if isinstance(exc, OSError) and not is_transient(exc):
                raise StudyError(f"{what}: cannot write the study's records ({exc.strerror}); "
                                 "what was recorded before is intact: fix this, then run "
                                 "again") from None
            if not is_transient(exc):
                if isinstance(exc, sqlalchemy.exc.DBAPIError):
                    raise StudyError(f"{what}: {_first_line(exc)}") from None
                raise
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                tqdm.write(f"lorasweep: {what} unreachable ({_first_line(exc)}); "
                           f"retrying for up to {patience:.0f} s", file=sys.stderr)
            if now - first_failure > patience:
                raise StudyError(f"{what}: unreachable for {patience:.0f} s "
                                 f"({_first_line(exc)})") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
