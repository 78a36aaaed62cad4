"""A throwaway single-node SLURM cluster for the tests: munged, slurmctld and slurmd of its own.

Debian's `slurm-wlm` and `munge` packages provide the daemons (scripts/setup.sh installs them as
root where it can; tests/system_parts.py finds them). Everything the cluster owns lives in one
temporary folder: its munge key and socket, slurm.conf, state, spool, logs, pid files; its ports
are free ones picked here. So two clusters (two pytest-xdist processes, two checkouts) never
meet, and `stop` ends exactly the daemons this one started. The daemons run as root
(`SlurmUser=root`) with no cgroups (`proctrack/linuxproc`, `task/none`), which is what a
container without systemd allows.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .system_parts import system_program

CRED_EXPIRE = 5  # seconds
CPUS = 4  # more than the machine may have: three workers at once (config_overrides trusts it)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lorasweep-slurm-"))
        self.root.chmod(0o755)
        self.node = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._daemon([str(system_program("munged")), "--foreground", "--force",
                      f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={self.root / 'munged.pid'}",
                      f"--seed-file={self.root / 'munged.seed'}",
                      f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(self.munge_socket, "munged")
        self.conf.write_text(self._config())
        self._daemon([str(system_program("slurmctld")), "-D", "-i", "-f", str(self.conf)])
        self._daemon([str(system_program("slurmd")), "-D", "-f", str(self.conf), "-N", self.node])
        deadline = time.time() + 30
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM node did not come up (state {state!r}):\n"
                           + self.logs())

    def _config(self) -> str:
        root = self.root
        return "\n".join([
            "ClusterName=lorasweep-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a job's credential lives this long: a requeued task waits it out before it
            # starts again (SLURM's default, 120 s, would hold the test up)
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=2",
            "InactiveLimit=0",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            ""])

    def _daemon(self, command: list[str]) -> None:
        with open(self.root / "log" / f"{Path(command[0]).name}.out", "ab") as log:
            self.processes.append(subprocess.Popen(command, env=self.env, stdout=log,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def _wait_for(self, path: Path, what: str) -> None:
        deadline = time.time() + 10
        while not path.exists():
            if time.time() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"{what} did not start:\n{self.logs()}")
            time.sleep(0.05)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, squeue, scancel...) against this cluster."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=30, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        return done

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        """End the daemons this cluster started (and their job steps), then its folder."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
