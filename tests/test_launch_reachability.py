"""Multi-host launch outside SLURM: a host that cannot be reached is named in one line, exit 2,
before any worker starts (never a hang); this machine's own names never go through ssh.

Real `python -m launch` runs with real unresolvable (`.invalid`, RFC 6761) and unroutable
(10.255.255.1) hosts; each run has a timeout, so a hang fails the test instead of blocking it.
Those runs happen in a network namespace of their own with only loopback up: ssh's attempt fails
at once ("Network is unreachable", no name server) and no packet leaves this machine.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.hosts import local_names, remote_hosts

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "scripts" / "launch_allreduce.py")
UNRESOLVABLE = "nosuchhost.invalid"
UNROUTABLE = "10.255.255.1"  # private range; no route inside the isolated namespace
# Runs the command in a new network namespace whose only link is loopback (needs root).
ISOLATED = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]

FAKE_SSH = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
echo "ssh: connect to host $5 port 22: Connection refused" >&2
exit 255
"""


def launch(args, tmp_path, env=None, timeout=120, isolated=False):
    """``isolated``: in a network namespace of its own (unreachable hosts are tried there)."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir(exist_ok=True)
    proc = subprocess.run([*(ISOLATED if isolated else ()), sys.executable, "-m", "launch", *args, WORKER,
                           "--pid-dir", str(pid_dir)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)
    return proc, sorted(p.name for p in pid_dir.iterdir())


def fake_ssh_env(tmp_path):
    """PATH with an ssh that records its arguments in ``tmp_path/bin/calls`` and always refuses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), bin_dir / "calls"


def assert_names_host(proc, host, started):
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"distrib-launch: error: cannot reach host '{host}' over ssh ("), proc.stderr
    assert f"ssh-copy-id {host}" in last and f"remove {host} from -H/--hostfile" in last
    assert "Traceback" not in proc.stderr
    assert started == [], f"workers started although {host} is unreachable: {started}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("host, reason", [
    (UNRESOLVABLE, "Could not resolve hostname"),
    (UNROUTABLE, f"{UNROUTABLE} port 22"),  # "Network is unreachable"
])
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_unreachable_host_in_h_is_named(tmp_path, host, reason, controller):
    proc, started = launch(["-np", "2", "--controller", controller, "-H", f"{host}:1,localhost:1"], tmp_path,
                           isolated=True)
    assert_names_host(proc, host, started)
    assert reason in proc.stderr.splitlines()[-1]


@pytest.mark.timeout(300)
def test_unreachable_host_in_hostfile_is_named(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"localhost slots=1\n{UNROUTABLE} slots=1\n{UNRESOLVABLE}:1\n")
    proc, started = launch(["-np", "3", "--hostfile", str(hostfile)], tmp_path, isolated=True)
    assert_names_host(proc, UNROUTABLE, started)  # the first unreachable host, in file order


@pytest.mark.timeout(300)
def test_ssh_check_uses_batch_mode_and_reports_sshs_reason(tmp_path):
    env, calls = fake_ssh_env(tmp_path)
    proc, started = launch(["-np", "2", "-H", "localhost:1,node7:1"], tmp_path, env=env)
    assert_names_host(proc, "node7", started)
    assert "(ssh: connect to host node7 port 22: Connection refused)" in proc.stderr.splitlines()[-1]
    # one ssh per host, which also checks the workers' Python and folder there
    assert calls.read_text().splitlines() == [f"-o BatchMode=yes -o ConnectTimeout=5 node7 test -x {sys.executable} "
                                              f"|| exit 3; test -d {REPO} || exit 4"]


def test_this_machines_names_are_local():
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
    assert remote_hosts(tuple((name, 1) for name in sorted(names)), local_names()) == ()


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_local_names_skip_ssh_and_run(tmp_path):
    """localhost, 127.0.0.1 and this hostname run without any ssh call (ssh here always refuses)."""
    env, calls = fake_ssh_env(tmp_path)
    proc, started = launch(["-np", "2", "-H", f"127.0.0.1:1,{socket.gethostname()}:1"], tmp_path, env=env,
                           timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sum=3" in proc.stdout and started == ["0.pid", "1.pid"]
    assert not calls.exists(), f"ssh was called for a local host: {calls.read_text()}"
