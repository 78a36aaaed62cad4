"""Whether workers on other machines can reach a study's records, for launchers that start
workers elsewhere (`lorasweep slurm`).

A refusal here must be certain, since a wrong one blocks a study that would have run: a
database on this machine's loopback address (or its Unix socket), a SQLite file, or a journal
file on a file system that only this machine mounts (ext4, xfs, tmpfs...) is refused only when
the workers may run on another machine. A file system type this module does not know (NFS,
Lustre, GPFS, BeeGFS, CephFS, a FUSE mount...) is taken as shared.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url

from lorasweep.errors import StudyError
from lorasweep.redact import redact_text

# File systems that live on one machine's own disks or memory.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs",
                               "overlay", "f2fs", "vfat", "exfat", "ntfs", "ntfs3", "jfs",
                               "reiserfs", "squashfs", "devtmpfs"})
LOOPBACK_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1", "ip6-localhost"})
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(path: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the file system `path` is on (the longest mount point above it); None where
    the mount table cannot be read."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = path.resolve()  # links followed as far as the path exists
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ")
        after = line.split(" - ", 1)[1].split()
        inside = target == Path(mount) or Path(mount) in target.parents
        if inside and len(mount) > best:
            best, kind = len(mount), after[0] if after else None
    return kind


def check_reachable(storage_url: str | None, folder: Path, elsewhere: list[str],
                    mountinfo: Path = MOUNTINFO) -> None:
    """Refuse (one line naming the option and what is allowed) storage that workers on the
    machines `elsewhere` (other than this one) could not reach; with none, anything goes."""
    if not elsewhere:
        return
    machines = ", ".join(elsewhere[:3]) + (" ..." if len(elsewhere) > 3 else "")
    if storage_url is None:
        kind = filesystem_type(folder, mountinfo)
        if kind in LOCAL_FILESYSTEMS:
            raise StudyError(
                f"--out {folder}: its journal file is on a local file system ({kind}) that "
                f"workers on {machines} cannot read; allowed: a folder on a shared file system "
                "(NFS, Lustre, GPFS, BeeGFS, CephFS), or --storage postgresql://USER@HOST/DB")
        return
    url = make_url(storage_url)
    if url.get_backend_name() == "sqlite":
        raise StudyError(f"--storage {redact_text(storage_url)}: a SQLite file is not for "
                         f"workers on many machines ({machines}); allowed: "
                         "postgresql://USER@HOST/DB, or the study folder's journal file on a "
                         "shared file system")
    host = (url.host or "").lower()
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        raise StudyError(f"--storage {redact_text(storage_url)}: a database on this machine's "
                         f"own address ({host or 'its Unix socket'}) cannot be reached from "
                         f"{machines}; allowed: a host name or address the workers reach, "
                         "e.g. postgresql://USER@DBHOST/DB")


def this_host() -> str:
    """This machine's short name, as SLURM names nodes."""
    return os.uname().nodename.split(".")[0]
