"""Where a study's records live (its Optuna storage backend), and riding out outages there.

This module is the one place that touches Optuna's storage internals: the journal file backend
(its flock lock, its torn-tail repair) and the private ids every storage call takes. The default
storage is a journal file inside the study folder (one machine, or a shared file system).
`--storage postgresql://USER@HOST/DB` puts the study in a database that workers on many
machines share. A database restart or a network blip must not end a day-long sweep, so every
storage call goes through `patiently`, which retries transient errors for a while; errors that
waiting cannot fix (a full disk, a wrong password) become one clear line at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import IO, TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from lorasweep.errors import StudyError
from lorasweep.redact import MASK, redact_text
from lorasweep.study.defaults import STORAGE_ENV

JOURNAL_NAME = "optuna.journal"
STORAGE_FILE = "storage.json"  # in a study folder: where the records live, when not in its journal
LOCK_SUFFIX = ".flock"  # the journal's lock file, beside it
DATABASE_SCHEMES = ("postgresql", "sqlite")
# File-system errors that may clear by themselves (NFS hiccups); the rest are the user's to fix.
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR}
# A database refusing us for good says so in these words; waiting will not change it.
PERMANENT_DB_WORDS = ("authentication failed", "does not exist", "no password supplied",
                      "permission denied")


# Optuna's private attributes, read here and nowhere else (with the journal lock above): the
# public API reaches the same ids only through one more storage call per trial.

def optuna_study_id(study: optuna.Study) -> int:
    """The storage's id of `study`, which every storage call takes."""
    return study._study_id


def optuna_trial_id(trial: optuna.trial.FrozenTrial) -> int:
    """The storage's id of `trial` (unique over studies, unlike its number)."""
    return trial._trial_id

T = TypeVar("T")


class FlockLock(BaseJournalFileLock):
    """The journal's lock as an flock on a side file, which the kernel releases when its holder
    dies: a killed worker never stalls the next one (Optuna's own lock files outlive their
    holder, and the next process waits out a 30 s grace period with warnings)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._threads = threading.Lock()  # flock excludes open files, not threads sharing one
        self._handle: IO[bytes] | None = None

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            handle = open(self._path, "ab")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        self._handle = handle
        return True

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()  # closing the file releases its flock
            self._threads.release()


def journal_lock(journal: str) -> FlockLock:
    """The lock every process holds to append to (or repair) the journal file `journal`."""
    return FlockLock(journal + LOCK_SUFFIX)


class SafeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file, kept readable through kills, full disks and stray bytes.

    A record cut short at the end (a killed or failed write) or junk after the last whole
    record is cut back, with one line saying so, when the journal is opened and before any
    append (which reads the last line only); nothing is ever appended after a partial line.
    Damage with whole records after it is not guessed at: it is one line naming its byte
    offset. (The append is re-stated rather than wrapped because the lock is not re-entrant and
    the checks must happen while it is held.)
    """

    def __init__(self, file_path: str) -> None:
        super().__init__(file_path, lock_obj=journal_lock(file_path))
        with get_lock_file(self._lock):
            self._cut_torn_tail()

    def read_logs(self, log_number_from: int) -> Generator[dict, None, None]:
        try:
            yield from super().read_logs(log_number_from)
        except ValueError:  # Optuna's reader found a line that is no record, records after it
            raise StudyError(self._describe_damage()) from None

    def append_logs(self, logs: list[dict]) -> None:
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        with get_lock_file(self._lock):
            length = os.path.getsize(self._file_path) if os.path.exists(self._file_path) else 0
            if length and not _last_line_is_record(self._file_path):
                length = self._cut_torn_tail()
            try:
                with open(self._file_path, "ab") as handle:
                    handle.write(text.encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError:
                with open(self._file_path, "r+b") as handle:
                    handle.truncate(length)
                raise

    def _cut_torn_tail(self) -> int:
        """Cut what follows the last whole record (held under the lock); the new length."""
        with open(self._file_path, "r+b") as handle:
            data = handle.read()
            end = _whole_length(data)
            if end == len(data):
                return end
            if end == 0 and b"\n" in data:
                raise StudyError(f"{self._file_path}: not an Optuna journal (no whole record "
                                 "in it); use another --out") from None
            handle.truncate(end)
        tqdm.write(f"lorasweep: {self._file_path}: cut {len(data) - end} bytes after byte {end}"
                   " (a record cut short by a killed or failed write, or junk); the whole "
                   "records before it are kept", file=sys.stderr)
        return end

    def _describe_damage(self) -> str:
        offset = number = 0
        with open(self._file_path, "rb") as handle:
            for line in handle:
                number += 1
                if not _is_record(line):
                    break
                offset += len(line)
        return (f"{self._file_path}: damaged at byte {offset} (line {number} is not a whole "
                "journal record) with records after it; not repaired, to lose nothing: restore "
                f"the file from a backup, or cut it at byte {offset} to keep what precedes it")


class ReadOnlyJournalBackend(SafeJournalFileBackend):
    """The journal file as a viewer (optuna-dashboard) reads it while workers write it: nothing
    is cut or appended. A record cut short at the end is skipped by Optuna's reader, and the
    next worker to open the journal repairs it; anything that would write is refused."""

    def __init__(self, file_path: str) -> None:  # skips the repair on opening: a viewer writes
        JournalFileBackend.__init__(self, file_path, lock_obj=journal_lock(file_path))

    def append_logs(self, logs: list[dict]) -> None:
        raise StudyError(f"{self._file_path}: opened read-only (lorasweep dashboard): "
                         "nothing is written to a study from its live view")


def _is_record(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        record = json.loads(line)
    except ValueError:  # also bytes that are not UTF-8
        return False
    return isinstance(record, dict) and "op_code" in record


def _whole_length(data: bytes) -> int:
    """How many bytes of a journal's `data` run up to the end of its last whole record."""
    end = data.rfind(b"\n") + 1
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        if _is_record(data[start:end]):
            return end
        end = start
    return 0


def _last_line_is_record(path: str) -> bool:
    """Whether the journal ends with a whole record, reading only its last line."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        span = 4096
        while True:
            start = max(0, size - span)
            handle.seek(start)
            data = handle.read()
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut >= 0 or start == 0:
                return _is_record(data[cut + 1:])
            span *= 4


def open_storage(url: str | None, folder: Path, patience: float) -> BaseStorage:
    """The study's storage: the folder's journal file, or the database at `url`."""
    if url is None:
        path = folder / JOURNAL_NAME
        return patiently(lambda: JournalStorage(SafeJournalFileBackend(str(path))),
                         f"{path}", patience)
    check_storage_url(url)
    return patiently(lambda: _database(url), f"--storage {redact_text(url)}", patience)


def _database(url: str, tries: int = 5) -> RDBStorage:
    """Optuna's storage in the database at `url`, creating its tables in a fresh database.

    Workers that all start at once on a fresh database (the pods of a Kubernetes Job) race to
    create the tables: PostgreSQL lets one win and fails the others on a duplicate key in its
    catalog. A loser tries again, and then finds the tables made. pool_pre_ping replaces
    connections that a database restart closed, instead of failing once.
    """
    for attempt in range(tries):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            raced = any(words in str(exc) for words in ("duplicate key", "already exists"))
            if not raced or attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def storage_of(folder: Path) -> str | None:
    """The database URL a folder's study lives in (None: the folder's journal file).

    The folder keeps the URL without its password; $LORASWEEP_STORAGE, when set, gives the full
    URL (or the client finds the password in PGPASSWORD or ~/.pgpass).
    """
    path = folder / STORAGE_FILE
    if not path.exists():
        return None
    return os.environ.get(STORAGE_ENV) or json.loads(path.read_text())["storage"]


def open_storage_to_view(url: str | None, journal: Path) -> BaseStorage:
    """A study's storage for a live view: the journal file read-only, or the database at `url`
    (which the view reads as the URL's user may; its tables are neither created nor upgraded)."""
    if url is None:
        if not journal.is_file():
            raise StudyError(f"{journal}: no such journal file (has the study started?)")
        return JournalStorage(ReadOnlyJournalBackend(str(journal)))
    check_storage_url(url)
    try:
        return RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True,
                          engine_kwargs={"pool_pre_ping": True})
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StudyError(f"--storage {redact_text(url)}: {_first_line(exc)}") from None


def check_storage_url(url: str) -> None:
    """Refuse, in one line that shows no secret, a URL that is not a database URL."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in DATABASE_SCHEMES:
        raise StudyError(f"--storage {redact_text(url)}: not a database URL; allowed: "
                         "postgresql://USER@HOST[:PORT]/DATABASE or sqlite:///FILE "
                         "(leave it out for the study folder's journal file)")
    try:
        make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:  # a port that is not a number
        raise StudyError(f"--storage {redact_text(url)}: not a database URL "
                         f"({redact_text(str(exc))})") from None


def storage_address(url: str) -> str:
    """The URL as the study folder records and compares it: every secret it carried left out,
    so that the database client looks for the password in PGPASSWORD or ~/.pgpass.

    Secrets are found by `redact_text` (the one routine that masks them) and then dropped.
    """
    masked = redact_text(url)
    try:
        parsed = make_url(masked)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return masked
    kept = {key: value for key, value in parsed.query.items()
            if MASK not in ((value,) if isinstance(value, str) else value)}
    # URL is a NamedTuple; its set() reads None as "keep", so the fields are replaced directly
    address = parsed._replace(password=None if parsed.password == MASK else parsed.password,
                              query=kept)
    return address.render_as_string(hide_password=False)


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
    """The error's first line, secrets masked (a driver may echo what it was given)."""
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(getattr(exc, "orig", None) or exc).strip()
    return redact_text(text.splitlines()[0]) if text else type(exc).__name__
