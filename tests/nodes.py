"""A cluster of N real hosts on this machine for multi-node tests: ``node1..nodeN``.

Each node is a Linux network namespace with its own address (198.18.0.i, the RFC 2544
benchmarking range, reachable only inside the namespaces), a UTS namespace with its own
hostname, a mount namespace with its own ``/tmp`` (a tmpfs: node-local, as on real clusters)
and an sshd, the way real nodes are reached. The nodes' links join a bridge that lives in a
namespace of its own, so nothing is added to this machine's own network. Everything else (the
checkout, ``.venv``, ``/var/tmp``) is the machine's file system, seen at the same path on every
node.

ssh uses a key and config of the cluster's own, in a folder under ``/var/tmp`` (not ``/tmp``,
which each node has its own of): commands run on the nodes get a ``PATH`` whose first folder holds
an ``ssh`` that adds ``-F <that config>``, so mpirun, horovodrun and the launcher's ssh check use it
and nothing of the machine's ssh set-up (``~/.ssh``, ``/etc/ssh``) is read or changed.

Fault levers: :meth:`NodeCluster.kill_node` (every process of a node, SIGKILL), :meth:`link`
(partition and heal), :meth:`limit_bandwidth` (``tc ... tbf``) and :meth:`start_node` (a killed node
boots again: new ``/tmp``, new sshd).

As a pytest fixture: ``from tests.nodes import nodes`` and use ``nodes`` (session-scoped, three
nodes). For debugging: ``python -m tests.nodes up [N]`` (prints how to reach the nodes) and
``python -m tests.nodes down`` (removes the clusters made by ``up`` and those of test runs that died;
a test run also removes the latter when it starts).
Needs root and ``scripts/nodes_setup.sh`` (openssh-server); a cluster that cannot start fails
the test with the step and its output.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.services import alive as _alive
from tests.services import run_setup_script, serve, session_fixture, spawn_detached

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
SETUP_SCRIPT = REPO / "scripts" / "nodes_setup.sh"
STATE_PARENT = "/var/tmp"          # shared by the nodes, unlike /tmp
STATE_PREFIX = "distrib-nodes-"
SUBNET = "198.18.0"                # RFC 2544: belongs to no real network
CGROUP_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
# Variables of an enclosing launcher or scheduler that must not leak into commands on the nodes.
FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "HOROVOD_", "OMPI_", "PMIX_", "DISTRIB_")


class NodeStartError(RuntimeError):
    """The cluster did not come up; the message names the step and its output."""


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeStartError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def ensure_installed() -> None:
    """Run scripts/nodes_setup.sh when sshd (openssh-server) is missing."""
    if Path("/usr/sbin/sshd").exists() and all(shutil.which(c) for c in ("ssh", "ssh-keygen", "ip", "tc", "nsenter")):
        return
    run_setup_script(SETUP_SCRIPT, NodeStartError)


class NodeCluster:
    """``n`` namespace hosts; all state (names, files) is recorded in ``root/cluster.json`` for :func:`down`."""

    def __init__(self, n: int, root: Path, tag: str):
        self.n, self.root, self.tag = n, root, tag
        self.names = [f"node{i}" for i in range(1, n + 1)]
        self.bridge_ns = f"dn{tag}-br"
        self.sshd_pids: Dict[str, int] = {}
        self.owner: Optional[int] = os.getpid()  # None: kept by hand (python -m tests.nodes up)

    # ----------------------------------------------------------------- naming
    def ns(self, name: str) -> str:
        return f"dn{self.tag}-{name}"

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def _save(self) -> None:
        (self.root / "cluster.json").write_text(json.dumps(
            {"namespaces": [self.bridge_ns, *map(self.ns, self.names)], "sshd_pids": self.sshd_pids,
             "owner": self.owner}))

    # ----------------------------------------------------------------- set-up
    def up(self) -> "NodeCluster":
        self._save()  # first: a failure below is still torn down by down()
        self._write_ssh_files()
        _sh("ip", "netns", "add", self.bridge_ns)
        _sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address(m)} {m}\n" for m in self.names)
        for i, name in enumerate(self.names, start=1):
            ns = self.ns(name)
            _sh("ip", "netns", "add", ns)
            # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: the nodes' names.
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts)
            _sh("ip", "-n", self.bridge_ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _sh("ip", "-n", self.bridge_ns, "link", "set", f"v{i}", "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for name in self.names:
            self.start_node(name)
        self._check_ssh()
        return self

    def _write_ssh_files(self) -> None:
        r = self.root
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "distrib-test-nodes", "-f", str(r / "id_ed25519"))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / "host_key"))
        (r / "sshd_config").write_text(f"""\
Port 22
HostKey {r}/host_key
AuthorizedKeysFile {r}/id_ed25519.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the key folder is under /var/tmp (world-writable): StrictModes would refuse it
StrictModes no
UseDNS no
MaxStartups 64
MaxSessions 64
PidFile none
LogLevel ERROR
""")
        (r / "ssh_config").write_text(f"""\
Host *
    IdentityFile {r}/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 5
""")
        (r / "bin").mkdir()
        wrapper = r / "bin" / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {r}/ssh_config "$@"\n')
        wrapper.chmod(0o755)

    def start_node(self, name: str, timeout: float = 20) -> None:
        """Boot ``name``: a fresh UTS and mount namespace (hostname, tmpfs /tmp and /run, cgroup
        mounts for slurmd) inside its network namespace, running its sshd. Also brings a killed
        node back. /run is the node's own, so sshd's /run/sshd is never made on this machine."""
        log = self.root / f"{name}.log"
        # A checkout under /tmp (CI may clone there) must stay visible through the node's own /tmp:
        # bind it aside, mount the tmpfs, move it back to the same path.
        keep_checkout = ""
        if REPO.is_relative_to("/tmp"):
            aside = self.root / f"checkout-{name}"
            aside.mkdir(exist_ok=True)
            keep_checkout = f"mount --bind {REPO} {aside}\n"
        cgroups = "".join(f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}\n"
                          for c in CGROUP_V1)
        # `ip netns exec` remounted /sys for the namespace (no cgroups there): slurmd needs the
        # host's v1 hierarchies, and a bare cgroup2 mount does not satisfy it on this kernel.
        boot = f"""set -e
hostname {name}
{keep_checkout}mount -t tmpfs -o mode=1777 tmpfs /tmp
{f"mkdir -p {REPO} && mount --move {aside} {REPO}" if keep_checkout else ""}
mount -t tmpfs tmpfs /sys/fs/cgroup
{cgroups}mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 none /sys/fs/cgroup/unified
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -f {self.root}/sshd_config
"""
        cmd = ["ip", "netns", "exec", self.ns(name), "unshare", "--uts", "--mount", "--propagation", "private",
               "--", "sh", "-c", boot]
        pid = spawn_detached(cmd, log)  # it outlives each test
        self.sshd_pids[name] = pid
        self._save()
        deadline = time.monotonic() + timeout
        while _comm(pid) != "sshd" or self.run(name, ["bash", "-c", "echo > /dev/tcp/127.0.0.1/22"],
                                                check=False, timeout=10).returncode != 0:
            if not _alive(pid) or time.monotonic() > deadline:
                raise NodeStartError(f"{name} did not boot: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def _check_ssh(self) -> None:
        first = self.names[0]
        for name in self.names:
            proc = self.run(first, ["ssh", name, "hostname"], check=False, timeout=30)
            if proc.returncode != 0 or proc.stdout.strip() != name:
                raise NodeStartError(f"ssh from {first} to {name} failed (exit {proc.returncode}): "
                                     f"{proc.stdout.strip()} {proc.stderr.strip()}")

    # ----------------------------------------------------------------- running things on nodes
    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment for commands on the nodes: the cluster's ssh first on PATH, then the venv."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
        env["PATH"] = f"{self.root}/bin:{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONPATH"] = str(REPO)
        env["PYTHONUNBUFFERED"] = "1"
        return {**env, **(extra or {})}

    def command(self, name: str, cmd: Sequence[str], cwd: os.PathLike | str = REPO) -> List[str]:
        """``cmd`` as run on ``name``: inside its namespaces (network, hostname, mounts: its /tmp)."""
        return ["nsenter", "-t", str(self.sshd_pids[name]), "-n", "-u", "-m", f"--wd={cwd}", "--", *map(str, cmd)]

    def run(self, name: str, cmd: Sequence[str], *, timeout: float = 300, check: bool = True,
            env: Optional[Dict[str, str]] = None, cwd: os.PathLike | str = REPO) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``name`` and wait (a hang raises TimeoutExpired: the test fails)."""
        proc = subprocess.run(self.command(name, cmd, cwd), env=self.env(env), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"on {name}: {' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, name: str, cmd: Sequence[str], env: Optional[Dict[str, str]] = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(name, cmd), env=self.env(env), **kw)

    def pids(self, name: str) -> List[int]:
        """Every process on ``name`` (in its network namespace)."""
        out = _sh("ip", "netns", "pids", self.ns(name), check=False).stdout
        return [int(p) for p in out.split()]

    def processes(self, name: str, comm: str = "python") -> List[str]:
        """``pid comm`` of the processes on ``name`` whose command name starts with ``comm``."""
        return [f"{p} {_comm(p)}" for p in self.pids(name) if _comm(p).startswith(comm)]

    # ----------------------------------------------------------------- faults
    def kill_node(self, name: str) -> None:
        """SIGKILL every process of ``name`` (its sshd too): the node is lost until :meth:`start_node`."""
        for _ in range(5):  # processes may fork while we kill
            pids = self.pids(name)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def link(self, name: str, up: bool) -> None:
        """Take ``name``'s link down (a partition: its packets go nowhere) or bring it back."""
        _sh("ip", "-n", self.ns(name), "link", "set", "eth0", "up" if up else "down")

    def limit_bandwidth(self, name: str, rate: Optional[str]) -> None:
        """``rate`` like ``1gbit`` (a token bucket on the node's link), or None to lift the limit."""
        if rate is None:
            _sh("tc", "-n", self.ns(name), "qdisc", "del", "dev", "eth0", "root", check=False)
        else:
            _sh("tc", "-n", self.ns(name), "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                "burst", "1mb", "latency", "50ms")

    def heal(self) -> None:
        """Every node up, linked and unlimited: what a test that used a fault lever leaves behind."""
        for name in self.names:
            self.link(name, True)
            self.limit_bandwidth(name, None)
            if not _alive(self.sshd_pids.get(name)):
                self.start_node(name)

    def down(self) -> None:
        down(self.root)


def down(root: os.PathLike | str) -> None:
    """Remove the cluster recorded in ``root``: its processes (by pid), namespaces, hosts files and files."""
    root = Path(root)
    try:
        state = json.loads((root / "cluster.json").read_text())
    except (OSError, ValueError):
        state = {"namespaces": []}
    for ns in state["namespaces"]:
        # `ip netns del` does not end the processes inside: kill them first, by pid.
        for _ in range(5):
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            if not out:
                break
            for pid in out:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    try:
        os.rmdir("/etc/netns")  # only when no other namespace has files there
    except OSError:
        pass
    shutil.rmtree(root, ignore_errors=True)


def start(n: int = 3, keep: bool = False) -> NodeCluster:
    """Install if needed and bring up ``n`` nodes; on any failure remove what was made, then raise.
    ``keep``: the cluster outlives this process (until ``python -m tests.nodes down``)."""
    if os.geteuid() != 0:
        raise NodeStartError("the multi-host test cluster needs root (network and mount namespaces)")
    ensure_installed()
    remove_orphans()
    root = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=STATE_PARENT))
    os.chmod(root, 0o755)
    cluster = NodeCluster(n, root, secrets.token_hex(2))
    if keep:
        cluster.owner = None
    try:
        return cluster.up()
    except BaseException:
        cluster.down()
        raise


def all_roots() -> List[str]:
    return sorted(glob.glob(os.path.join(STATE_PARENT, STATE_PREFIX + "*")))


def _owner(root: str):
    """The pid of the process a cluster belongs to, None when made by ``up``, "?" when unknown."""
    try:
        return json.loads(Path(root, "cluster.json").read_text()).get("owner")
    except (OSError, ValueError):
        return "?"  # being made right now, or not ours


def in_use(root: str) -> bool:
    owner = _owner(root)
    return owner == "?" or (isinstance(owner, int) and _alive(owner))


def remove_orphans() -> None:
    """Remove the clusters whose owner died without tearing them down (a test run that was
    SIGKILLed); one a live run uses, or one made by ``python -m tests.nodes up``, is left alone."""
    for root in all_roots():
        if isinstance(_owner(root), int) and not in_use(root):
            down(root)


@session_fixture
def nodes():
    """Three running nodes (node1..node3); torn down after the session, also when tests fail."""
    yield from serve(lambda: start(3), NodeCluster.down, "the multi-host test cluster")


def _main(argv: List[str]) -> int:
    if argv[:1] == ["up"]:
        c = start(int(argv[1]) if len(argv) > 1 else 3, keep=True)
        print(f"{c.n} nodes up ({', '.join(c.names)}); state in {c.root}")
        print(f"a shell on node1: nsenter -t {c.sshd_pids['node1']} -n -u -m --wd={REPO} -- env "
              f"PATH={c.root}/bin:{VENV_BIN}:$PATH bash")
        print("remove: python -m tests.nodes down")
        return 0
    if argv[:1] == ["down"]:
        # Without arguments: those made by `up` and those whose test run died, never one in use.
        roots = argv[1:] or [r for r in all_roots() if not in_use(r)]
        for root in roots:
            down(root)
        busy = len(all_roots()) if not argv[1:] else 0
        print(f"removed {len(roots)} cluster(s)" + (f"; {busy} in use by a running test left alone" if busy else ""))
        return 0
    sys.stderr.write("usage: python -m tests.nodes up [N] | down [STATE_DIR ...]\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
