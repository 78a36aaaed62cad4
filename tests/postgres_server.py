"""A throwaway PostgreSQL server for the tests: its own cluster in a temporary folder.

The tests start and stop it themselves (to test outages), so they own the cluster rather than
use a system one. Debian's `postgresql` package provides the binaries (scripts/setup.sh installs
it where it can; tests/system_parts.py finds them);
initdb refuses to run as root, so as root the server runs as the `postgres` user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "lorasweep"


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="lorasweep-pg-"))
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.port = _free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync")
        self.databases = 0

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_owner, str(self.bindir / tool), *args],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip()}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def new_database(self, password: str | None = None) -> str:
        """A fresh, empty database; its SQLAlchemy URL.

        With a password, the database belongs to its own role that must log in with it (the
        cluster trusts every other role), and the URL carries the password.
        """
        self.databases += 1
        name = f"study{self.databases}"
        where = ("-h", "127.0.0.1", "-p", str(self.port), "-U", USER)
        if password is None:
            self._run("createdb", *where, name)
            return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"
        role = f"{name}_owner"
        self._run("psql", *where, "-d", "postgres", "-c",
                  f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        self._run("createdb", *where, "-O", role, name)
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self._run("pg_ctl", "-D", str(self.data), "reload")
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
