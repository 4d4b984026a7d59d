"""A real one-node Slurm cluster for tests: munged + slurmctld + slurmd in a temporary folder.

Import the fixture into a test module (``from tests.slurm_cluster import slurm_cluster``) and
use it as ``slurm_cluster``: a session-scoped :class:`SlurmCluster` with helpers to submit
sbatch scripts, wait for jobs and read their output. Everything runs as the current (root)
user on free ports, with its own munge socket, so it touches no system-wide Slurm. When
Slurm cannot start, the test fails with the reason (never skips). ``python -m
tests.slurm_cluster`` starts a cluster, runs ``sinfo`` and stops it, for debugging.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.services import alive as _alive
from tests.services import run_setup_script, serve, session_fixture, spawn_detached

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
SETUP_SCRIPT = REPO / "scripts" / "slurm_setup.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}
CPUS = 2      # the one-node test cluster: a 2-core machine (the CI machine has 2 cores)
GPUS = 2      # fake GPUs (gres without device files) so the GPU sbatch scripts are accepted


class SlurmStartError(RuntimeError):
    """The test cluster did not come up; the message says which step failed and where its log is."""


@dataclass
class Job:
    """One ``scontrol show job`` record (the fields tests look at)."""
    job_id: str
    state: str
    exit_code: str
    restarts: int
    raw: Dict[str, str] = field(repr=False, default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def ensure_installed() -> None:
    """Install slurm-wlm and munge with scripts/slurm_setup.sh when a command is missing."""
    if all(shutil.which(c) or Path("/usr/sbin", c).exists() for c in DAEMONS):
        return
    run_setup_script(SETUP_SCRIPT, SlurmStartError)


class SlurmCluster:
    """munged, slurmctld and slurmd under ``root`` (a temporary folder); ``stop()`` kills them."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.munge_dir = root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.logs = root / "log"
        self._daemons: Dict[str, int] = {}  # name -> pid
        self._groups: Dict[str, int] = {}   # name -> process group to kill

    # ----------------------------------------------------------------- environment
    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment for Slurm commands and the jobs they start.

        sbatch exports it to the job (``--export=ALL``), so job steps find the project's
        venv first on PATH and import the repository's packages.
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "HOROVOD_",
                                    "OMPI_", "PMIX_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONHOME", None)
        if extra:
            env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; raises with its output when it fails."""
        proc = subprocess.run(self.client(cmd), env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: "
                               f"{proc.stdout.strip()} {proc.stderr.strip()}")
        return proc

    def client(self, cmd: Sequence[str], cwd: os.PathLike | str = REPO) -> List[str]:
        """``cmd`` as run where Slurm's clients reach slurmctld (here: this machine)."""
        return list(cmd)

    def daemon(self, name: str, cmd: List[str]) -> List[str]:
        """``cmd`` as run on the host of daemon ``name`` (here: this machine)."""
        return cmd

    # ----------------------------------------------------------------- start / stop
    def config_text(self, *, ctld_host: str, ctld_port: int, slurmd_port: int, per_node: str, nodes: str,
                    partition: str) -> str:
        """slurm.conf; ``per_node`` ("" or "-%n") names the slurmd files of each node apart."""
        r = self.root
        return f"""\
ClusterName=distribtest
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Run the main scheduling pass every 2 s (default 60 s): a requeued job starts soon after its BeginTime.
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=0
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{per_node}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{per_node}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}PartitionName=debug Nodes={partition} Default=YES MaxTime=INFINITE State=UP
"""

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text(self.config_text(
            ctld_host=self.host, ctld_port=ctld_port, slurmd_port=slurmd_port, per_node="",
            nodes=f"NodeName={self.host} CPUs={CPUS} RealMemory=8000 Gres=gpu:{GPUS} State=UNKNOWN\n",
            partition=self.host))
        # Fake GPUs: Slurm wants a character device per GPU (a gpu gres without File counts as
        # 0 and drains the node), and symlinks to /dev/null pass its check. Jobs can then ask for
        # --gpus-per-node and get SLURM_GPUS_ON_NODE, which is what the GPU sbatch scripts need.
        for i in range(GPUS):
            (self.root / f"fakegpu{i}").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu File={self.root}/fakegpu[0-{GPUS - 1}]\n")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            raise SlurmStartError(f"{key} is missing: run {SETUP_SCRIPT}")
        cmd = ["runuser", "-u", "munge", "--", "munged", "--foreground", "--force",
               f"--socket={self.munge_socket}", f"--log-file={self.munge_dir}/munged.log",
               f"--pid-file={self.munge_dir}/munged.pid", f"--seed-file={self.munge_dir}/munged.seed"]
        self._spawn("munged", cmd)
        self._wait_for(lambda: self.munge_socket.exists(), 15, "munged socket",
                       self.munge_dir / "munged.log")

    def _spawn(self, name: str, cmd: List[str]) -> None:
        """Start a daemon detached from this process, for the whole session, in a process group
        of its own, which stop() kills."""
        pid = spawn_detached(self.daemon(name, cmd), self.logs / f"{name}.out", env=self.env(), cwd=self.root)
        self._daemons[name] = pid
        self._groups[name] = os.getpgid(pid)  # the setsid'd shell's group: the daemon and its helpers

    def _wait_for(self, ready, timeout: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name, pid in self._daemons.items():
                if not _alive(pid):
                    raise SlurmStartError(
                        f"{name} exited while waiting for {what}:\n"
                        f"{_tail(self.logs / f'{name}.out')}\n{_tail(log)}")
            time.sleep(0.3)
        raise SlurmStartError(f"timed out after {timeout:.0f}s waiting for {what}; last log lines:\n{_tail(log)}")

    def node_state(self) -> str:
        """The nodes' states, one per line (one line on the one-node cluster)."""
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def _node_ready(self) -> bool:
        states = self.node_state().split()
        bad = [s for s in states if s.startswith(("drain", "inval"))]
        if bad:  # never becomes idle by itself: say why now
            reason = self.run("sinfo", "-h", "-N", "-o", "%N %E", check=False).stdout.strip()
            raise SlurmStartError(f"a node is {bad[0]}: {reason}\n"
                                  f"{_tail(self.logs / 'slurmctld.log', 10)}")
        return bool(states) and all(s == "idle" for s in states)

    def slurmds(self) -> List[str]:
        """The slurmd daemons to start (one per node)."""
        return ["slurmd"]

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.logs.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        for name in self.slurmds():
            self._spawn(name, ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(self._node_ready, timeout, "sinfo to show every node idle",
                       self.logs / "slurmctld.log")
        return self

    def stop(self) -> None:
        """Cancel the jobs, then kill the daemons this object started (never others)."""
        if _alive(self._daemons.get("slurmctld")):
            try:
                self.run("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name,
                         check=False, timeout=10)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in (*self.slurmds(), "slurmctld", "munged"):
            pid, group = self._daemons.pop(name, None), self._groups.pop(name, None)
            if not _alive(pid):
                continue
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _alive(pid):
                    break

    # ----------------------------------------------------------------- jobs
    def sbatch(self, script: os.PathLike | str, *script_args: str, sbatch_args: Sequence[str] = (),
               env: Optional[Dict[str, str]] = None, cwd: os.PathLike | str = REPO) -> str:
        """Submit ``script`` (a path) with ``script_args``; returns the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *script_args]
        proc = subprocess.run(self.client(cmd, cwd), env=self.env(env), capture_output=True, text=True, timeout=30,
                              cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        out = self.run("scontrol", "show", "job", "-o", job_id, timeout=10).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return Job(job_id, fields.get("JobState", "?"), fields.get("ExitCode", "?"),
                   int(fields.get("Restarts", "0") or 0), fields)

    def wait(self, job_id: str, timeout: float, states=TERMINAL_STATES, output: Optional[Path] = None) -> Job:
        """Poll until the job reaches one of ``states``; on timeout cancel it and raise with its log."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                self.run("scancel", "--full", job_id, check=False)
                out = _tail(output, 40) if output else ""
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f}s\n{out}\n"
                                   f"--- slurmd.log\n{_tail(self.logs / 'slurmd.log', 20)}")
            time.sleep(0.5)

    def scancel(self, job_id: str, *args: str) -> None:
        self.run("scancel", *args, job_id)

    def wait_until(self, predicate, timeout: float, what: str, job_id: Optional[str] = None,
                   output: Optional[os.PathLike] = None) -> None:
        """Poll ``predicate()`` every 0.1 s; on timeout raise with the job's state and log."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if job_id is not None and self.job(job_id).state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended ({self.job(job_id).state}) before {what}\n"
                                     f"{_tail(output, 40) if output else ''}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                   f"{_tail(output, 40) if output else ''}")
            time.sleep(0.1)

    def wait_requeued(self, job_id: str, timeout: float = 60, restarts: int = 1) -> Job:
        """Wait until a job has been requeued ``restarts`` times (pending again, or already running again).

        Slurm holds a requeued job for cred_expire + 1 s (Reason=BeginTime): slurmd refuses to
        start a job whose previous credential it still holds as revoked ("Job credential
        revoked", the job then FAILS). Forcing StartTime=now hits exactly that race, so the
        test cluster shortens cred_expire to 10 s instead (AuthInfo in _write_config; Slurm accepts
        5 or more, and a step's credential must still outlast its launch on a loaded machine).
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.restarts >= restarts and job.state in ("PENDING", "RUNNING"):
                return job
            if job.state in TERMINAL_STATES or time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} was not requeued: {job.state}, restarts {job.restarts}, "
                                     f"reason {job.raw.get('Reason')}")
            time.sleep(0.2)

    @staticmethod
    def read(path: os.PathLike | str) -> str:
        return Path(path).read_text(errors="replace") if Path(path).exists() else ""


def start_cluster() -> SlurmCluster:
    """Install if needed and start a cluster in a fresh temporary folder (stopped on failure)."""
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="distrib-slurm-"))
    os.chmod(root, 0o755)  # the munge user must reach its socket folder inside
    cluster = SlurmCluster(root)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


class MultiNodeSlurm(SlurmCluster):
    """Slurm on the namespace hosts of tests/nodes.py: slurmctld on the first node, a slurmd on
    each (its NodeName is the node's hostname; its own spool, pid and log files), the machine's
    munged for all (its socket is a path every node sees). Its folder is under the nodes' shared
    state folder (each node has its own /tmp), and its client commands run on the first node,
    the only place slurmctld's address is reachable from."""

    def __init__(self, root: Path, nodes, names: Sequence[str]):
        super().__init__(root)
        self.nodes, self.names = nodes, list(names)
        self.host = self.names[0]

    def client(self, cmd: Sequence[str], cwd: os.PathLike | str = REPO) -> List[str]:
        return self.nodes.command(self.host, cmd, cwd)

    def daemon(self, name: str, cmd: List[str]) -> List[str]:
        if name == "munged":
            return cmd  # on this machine: its socket is a path the nodes see
        return self.nodes.command(self.host if name == "slurmctld" else name.split("-", 1)[1], cmd)

    def slurmds(self) -> List[str]:
        return [f"slurmd-{n}" for n in self.names]

    def _write_config(self) -> None:
        for sub in ("state", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        first = self.names[0]
        nodes = "".join(f"NodeName={n} NodeAddr={self.nodes.address(n)} CPUs=1 RealMemory=4000 Gres=gpu:1 "
                        f"State=UNKNOWN\n" for n in self.names)
        self.conf.write_text(self.config_text(
            ctld_host=f"{first}({self.nodes.address(first)})", ctld_port=6817, slurmd_port=6818, per_node="-%n",
            nodes=nodes, partition=",".join(self.names)))
        (self.root / "fakegpu0").symlink_to("/dev/null")  # see SlurmCluster._write_config
        (self.root / "gres.conf").write_text(f"Name=gpu File={self.root}/fakegpu0\n")


def start_multi_node(nodes, names: Sequence[str] = ("node1", "node2")) -> MultiNodeSlurm:
    """A Slurm cluster on ``names`` of a running tests/nodes.py cluster (stopped on failure)."""
    ensure_installed()
    root = nodes.root / "slurm"
    root.mkdir()
    os.chmod(root, 0o755)
    cluster = MultiNodeSlurm(root, nodes, names)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


def _stop_and_remove(cluster: SlurmCluster) -> None:
    cluster.stop()
    if not os.environ.get("DISTRIB_KEEP_SLURM"):  # set it to keep the daemons' logs
        shutil.rmtree(cluster.root, ignore_errors=True)


@session_fixture
def slurm_cluster():
    """A running one-node Slurm cluster (2 CPUs, 2 fake GPUs); fails the test if it cannot start."""
    yield from serve(start_cluster, _stop_and_remove, "the test Slurm cluster")


@session_fixture
def slurm_nodes(nodes):
    """Slurm on node1 and node2 of the namespace cluster; fails the test if it cannot start."""
    # its folder goes with the nodes' state folder
    yield from serve(lambda: start_multi_node(nodes), SlurmCluster.stop, "Slurm on the namespace hosts")


if __name__ == "__main__":
    c = start_cluster()
    try:
        print(c.run("sinfo").stdout, end="")
        print("root:", c.root)
        if len(sys.argv) > 1 and sys.argv[1] == "--hold":
            input("cluster running; SLURM_CONF=%s; press enter to stop " % c.conf)
    finally:
        c.stop()
