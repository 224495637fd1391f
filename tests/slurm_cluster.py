"""A real one-node Slurm cluster on this machine, for the tests and the benchmark.

Its own munged (own key and socket), slurmctld and slurmd, all in the foreground as children of
this process, with a slurm.conf in a fresh directory on free ports; clients find it through
SLURM_CONF, so nothing touches a system-wide Slurm or munge. Works without systemd or cgroups
(proctrack/linuxproc, task/none), as root. `stop()` cancels every job and ends every daemon it
started, and only those.
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

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
INSTALL_HINT = (
    "install them with: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge "
    "(.ci/run does this)"
)


class SlurmUnavailable(RuntimeError):
    pass


def missing_programs() -> list[str]:
    missing = [path for path in DAEMONS.values() if not os.access(path, os.X_OK)]
    return missing + [name for name in CLIENTS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path | None = None, quick_requeue: bool = True):
        # Short path: the munge socket path must fit in a sockaddr_un (108 bytes); and munged wants
        # every directory above its socket to be traversable by all (pytest's temporary
        # directories are not). Removed by stop() when made here.
        self._made_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.node = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: dict[str, subprocess.Popen] = {}
        # Slurm holds a requeued job for `cred_expire` (default 120 s) and the main scheduler runs
        # every 60 s; shortened here so a requeue takes seconds (False: Slurm's defaults).
        self.quick_requeue = quick_requeue

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Starts the daemons; on any failure stops whatever it had started, then raises."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> SlurmCluster:
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"Slurm/munge programs missing: {', '.join(missing)}; {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise SlurmUnavailable(
                "the local Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root"
            )
        for name in ("state", "spool", "log", "munge"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        # munged insists that everyone may traverse the directories of its socket.
        for directory in (self.root, self.root / "munge"):
            os.chmod(directory, 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.socket = self.root / "munge" / "socket"
        if len(str(self.socket).encode()) > 100:
            raise SlurmUnavailable(f"munge socket path too long for a Unix socket: {self.socket}; use a shorter root")
        self._spawn(
            "munged",
            [
                DAEMONS["munged"],
                "--foreground",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
            ],
        )
        self._wait(lambda: self._alive() and self.socket.exists(), timeout, "munged to create its socket")
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", [DAEMONS["slurmctld"], "-D", "-i"])
        self._spawn("slurmd", [DAEMONS["slurmd"], "-D"])
        self._wait(self._node_idle, timeout, f"node {self.node} to be idle")
        return self

    def stop(self) -> None:
        """Cancels all jobs, then stops the daemons this object started (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
            try:
                self._wait(lambda: not self.squeue(), 60, "jobs to end")
            except TimeoutError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            process = self._daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._made_root and not self._daemons:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- clients ----------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, *argv: str, env: dict | None = None) -> str:
        """Submits; returns the job id (for an array, the array's id)."""
        return self.run("sbatch", "--parsable", *argv, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (first record: for an array, ask per element id)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False).stdout.strip()
        fields = {}
        for token in out.splitlines()[0].split() if out else []:
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record `scontrol show job` prints for an id (all elements of an array)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False).stdout.strip()
        return [dict(token.partition("=")[::2] for token in line.split()) for line in out.splitlines() if line]

    def squeue(self) -> list[str]:
        return self.run("squeue", "--noheader", "--format=%i %T", check=False).stdout.split("\n")[:-1]

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Waits until the job is in one of `states`; fails early if it ends in another."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if state in final:
                raise AssertionError(
                    f"job {job_id} ended {state} (exit {info.get('ExitCode')}), expected {sorted(states)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s, expected {sorted(states)}")
            time.sleep(0.5)

    # -- internals --------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._daemons[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _alive(self) -> bool:
        for name, process in self._daemons.items():
            if process.poll() is not None:
                log = (self.root / "log" / f"{name}.out").read_text(errors="replace").strip().splitlines()
                raise SlurmUnavailable(
                    f"{name} exited with code {process.returncode}: {log[-1] if log else 'no output'}"
                )
        return True

    def _node_idle(self) -> bool:
        self._alive()
        out = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.split()
        return out == ["idle"]

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def _slurm_conf(self) -> str:
        import psutil

        memory_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)
        root = self.root
        return f"""\
# Written by tests/slurm_cluster.py: a one-node cluster without systemd or cgroups.
ClusterName=sleepscale-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}{",cred_expire=10" if self.quick_requeue else ""}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
{"SchedulerParameters=sched_interval=2,bf_interval=2" if self.quick_requeue else "# Slurm's default intervals"}
JobRequeue=1
KillWait=10
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
