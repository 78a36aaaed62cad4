"""`lorasweep dashboard`: optuna-dashboard on a study's records, live while it runs.

The dashboard polls the storage, so a running study needs nothing from it: each trial shows
with its `lr` parameter and its validation metric as the value as soon as a worker records it.
The journal file is opened read-only (`backend.ReadOnlyJournalBackend`: a viewer neither repairs
nor appends to what workers write); a database is read with the URL's own rights.
optuna-dashboard is optional, found at run time (`lorasweep.optional`).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from optuna.storages import BaseStorage

from lorasweep.errors import StudyError
from lorasweep.optional import require
from lorasweep.redact import redact_text
from lorasweep.study.backend import (
    JOURNAL_NAME,
    open_storage_to_view,
    storage_address,
    storage_of,
)

PACKAGE = "optuna-dashboard"


def locate(source: str, storage_url: str | None = None) -> tuple[str | None, Path]:
    """Where a study's records are: (a database URL, or None for the journal file; the journal).

    `source` is a study folder, a journal file, or a database URL; a folder whose study lives in
    a database takes `storage_url` (with the password the folder does not keep) when it names
    that database, else the folder's own address (the client finds the password elsewhere).
    """
    if "://" in source:
        return source, Path(JOURNAL_NAME)
    path = Path(source)
    if path.is_dir():
        url = storage_of(path)
        if (url is not None and storage_url is not None
                and storage_address(storage_url) == storage_address(url)):
            url = storage_url
        return url, path / JOURNAL_NAME
    if path.is_file():
        return None, path
    raise StudyError(f"{redact_text(source)}: no study folder, journal file or database URL "
                     "there")


def open_view(source: str, storage_url: str | None = None) -> tuple[BaseStorage, str]:
    """The storage to show, and how to name it in messages (no secret in it)."""
    url, journal = locate(source, storage_url)
    storage = open_storage_to_view(url, journal)
    return storage, (f"--storage {redact_text(url)}" if url else str(journal))


def study_urls(storage: BaseStorage, base: str) -> list[str]:
    """One line per study in the storage: its name and its page of trials."""
    return [f"  study {study.study_name}: {base}studies/"
            f"{storage.get_study_id_from_name(study.study_name)}/trialTable"
            for study in storage.get_all_studies()]


def serve(source: str, host: str, port: int, storage_url: str | None = None) -> None:
    """Open optuna-dashboard on the study's storage at http://HOST:PORT until interrupted."""
    require("optuna_dashboard", PACKAGE, "lorasweep dashboard")
    if not 0 < port < 65536:
        raise StudyError(f"--port {port}: must be between 1 and 65535")
    storage, where = open_view(source, storage_url)
    import optuna_dashboard

    base = f"http://{host}:{port}/dashboard/"
    print("\n".join([f"optuna-dashboard on {where}: {base} (Ctrl-C stops it)",
                     *study_urls(storage, base)]), flush=True)
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise StudyError(f"--host {host} --port {port}: cannot listen there "
                             f"({exc.strerror}); pick another --port or --host") from None
        raise
    finally:
        sys.stdout.flush()
