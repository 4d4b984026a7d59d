"""Golden tests of launch/torch_plan.py (--engine torch): which worker runs where with which
torchrun variables, and the exact commands, with MASTER_PORT as a parameter."""
import json

import pytest

from launch.cli import LaunchConfig
from launch.plan import Tools, describe
from launch.torch_plan import (TorchWorker, build_torch_plan, forwarded_env, free_port_argv, layout, master_address,
                               srun_argv, ssh_argv, start_via, worker_env)
from launch.torch_spawn import choose_port, free_port, split_argv

TOOLS = Tools(python="/venv/bin/python")
LOCAL = frozenset({"vm"})
WORKER = ["/venv/bin/python", "-m", "launch.worker", "train.py", "--", "--steps", "5"]
SPAWN = ["/venv/bin/python", "-m", "launch.torch_spawn"]
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
SRUN = ["srun", "--nodes=1", "--ntasks=1", "--nodelist=node2", "--overlap", "--mpi=none", "--kill-on-bad-exit=1",
        "--chdir=/src"]


def config(**kw):
    base = dict(script="train.py", script_args=("--steps", "5"), np=2, hosts=(("localhost", 2),), engine="torch")
    return LaunchConfig(**{**base, **kw})


def plan(slurm_nodes=frozenset(), **kw):
    return build_torch_plan(config(**kw), tools=TOOLS, local=LOCAL, this_host="vm", slurm_nodes=slurm_nodes)


def W(rank, local_rank, local_size, host, via="local"):
    return TorchWorker(rank, local_rank, local_size, host, via)


@pytest.mark.parametrize("hosts, np, via, expected", [
    ((("localhost", 2),), 2, {}, [W(0, 0, 2, "localhost"), W(1, 1, 2, "localhost")]),
    # the second host's workers continue the ranks and count their local ranks from 0
    ((("node1", 2), ("node2", 2)), 4, {"node2": "ssh"},
     [W(0, 0, 2, "node1"), W(1, 1, 2, "node1"), W(2, 0, 2, "node2", "ssh"), W(3, 1, 2, "node2", "ssh")]),
    # fewer workers than slots: the hosts fill in order, the last one partly
    ((("node1", 2), ("node2", 4), ("node3", 4)), 3, {"node1": "srun", "node2": "srun", "node3": "srun"},
     [W(0, 0, 2, "node1", "srun"), W(1, 1, 2, "node1", "srun"), W(2, 0, 1, "node2", "srun")]),
])
def test_layout_fills_hosts_in_order(hosts, np, via, expected):
    assert list(layout(hosts, np, via)) == expected


def test_start_via_srun_only_for_the_allocations_other_nodes():
    hosts = (("vm", 1), ("n2", 1), ("n3", 1), ("localhost", 1))
    assert start_via(hosts, LOCAL, frozenset({"vm", "n2"})) == {"vm": "local", "n2": "srun", "n3": "ssh",
                                                                "localhost": "local"}


@pytest.mark.parametrize("workers, expected", [
    ([W(0, 0, 2, "localhost"), W(1, 1, 2, "localhost")], "127.0.0.1"),        # all here: loopback
    ([W(0, 0, 1, "vm"), W(1, 0, 1, "node2", "ssh")], "vm"),                   # rank 0's host as named
    ([W(0, 0, 1, "localhost"), W(1, 0, 1, "node2", "ssh")], "vm"),            # not our 'localhost'
    ([W(0, 0, 1, "127.0.0.1"), W(1, 0, 1, "node2", "srun")], "vm"),
    ([W(0, 0, 1, "node2", "ssh"), W(1, 0, 1, "node3", "ssh")], "node2"),      # the launcher runs none
])
def test_master_address_is_rank_0s_host_as_the_others_reach_it(workers, expected):
    assert master_address(workers, this_host="vm") == expected


def test_worker_env_is_exactly_torchruns_variables_and_the_engine():
    assert worker_env(W(3, 1, 2, "node2", "ssh"), 4, "node1", 29511) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node1",
        "MASTER_PORT": "29511", "DISTRIB_ENGINE": "torch"}


def test_plan_on_one_host():
    p = plan()
    assert list(p.argv) == [*SPAWN, "-np", "2", "-H", "localhost:2", "--master-addr", "127.0.0.1", "--", *WORKER]
    assert (p.engine, p.controller, dict(p.env)) == ("torch", "torch", {})


def test_plan_across_hosts_names_the_remote_ones():
    p = plan(np=3, hosts=(("vm", 1), ("node2", 2)))
    assert list(p.argv) == [*SPAWN, "-np", "3", "-H", "vm:1,node2:2", "--ssh", "node2", "--master-addr", "vm",
                            "--", *WORKER]


def test_plan_inside_a_slurm_allocation_starts_its_other_nodes_by_srun():
    p = plan(np=3, hosts=(("vm", 1), ("node2", 1), ("outside", 1), ("unused", 1)), slurm_nodes=frozenset({"vm", "node2"}))
    assert list(p.argv) == [*SPAWN, "-np", "3", "-H", "vm:1,node2:1,outside:1,unused:1", "--ssh", "outside",
                            "--srun", "node2", "--master-addr", "vm", "--", *WORKER]


def test_plan_with_every_worker_remote_meets_at_the_first_host():
    p = plan(np=2, hosts=(("node2", 1), ("node3", 1)), script_args=("--name", "my run"))
    assert list(p.argv) == [*SPAWN, "-np", "2", "-H", "node2:1,node3:1", "--ssh", "node2,node3",
                            "--master-addr", "node2", "--", *WORKER[:5], "--name", "my run"]
    assert p.command.endswith("train.py -- --name 'my run'")


def test_spawn_argv_splits_at_its_own_double_dash_only():
    options, worker = split_argv(list(plan().argv[3:]))
    assert options == ["-np", "2", "-H", "localhost:2", "--master-addr", "127.0.0.1"] and worker == WORKER


def test_remote_command_keeps_the_environment_off_the_command_line():
    argv = ssh_argv("node2", "/venv/bin/python", "/home/u/my code", WORKER)
    assert list(argv) == [*SSH, "node2", "cd '/home/u/my code' && exec /venv/bin/python -m launch.torch_spawn "
                          "--env-from-stdin /venv/bin/python -m launch.worker train.py -- --steps 5"]
    probe = ["/venv/bin/python", "-c", "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"]
    assert list(free_port_argv(W(0, 0, 1, "node2", "ssh"), "/venv/bin/python", "/src")) == [
        *SSH, "node2", "/venv/bin/python -c 'import socket; s = socket.socket(); s.bind(('\"'\"''\"'\"', 0)); "
                       "print(s.getsockname()[1])'"]
    assert list(free_port_argv(W(0, 0, 1, "node2", "srun"), "/venv/bin/python", "/src")) == [*SRUN, *probe]
    assert list(srun_argv("node2", "/src", WORKER)) == [*SRUN, *WORKER]


def test_forwarded_env_keeps_what_workers_need_and_drops_per_process_values():
    env = {"PATH": "/bin", "HOME": "/root", "PYTHONPATH": "/src", "DISTRIB_STATUS_SECRET": "ab", "NCCL_DEBUG": "INFO",
           "GLOO_SOCKET_IFNAME": "eth0", "TORCH_CPP_LOG_LEVEL": "INFO", "RANK": "7", "MASTER_PORT": "1",
           "DISTRIB_ENGINE": "horovod", "HOROVOD_RANK": "3", "SSH_AUTH_SOCK": "/s", "SLURM_PROCID": "0"}
    assert list(forwarded_env(env)) == ["DISTRIB_STATUS_SECRET", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG", "PATH",
                                        "PYTHONPATH", "TORCH_CPP_LOG_LEVEL"]


def test_describe_names_the_engine_and_the_port_rule():
    cfg = config(np=3, hosts=(("localhost", 2), ("node2", 2)), max_restarts=2)
    text = describe(cfg, build_torch_plan(cfg, tools=TOOLS, local=LOCAL, this_host="vm"), LOCAL)
    assert text.splitlines() == [
        "distrib-launch: engine: torch (torch.distributed, each worker started by distrib-launch); "
        "MASTER_PORT: free on rank 0's host, new at each attempt",
        "distrib-launch: hosts: localhost:2, node2:2 (remote); np: 3",
        "distrib-launch: max restarts: 2; hang timeout: off",
        "distrib-launch: command: /venv/bin/python -m launch.torch_spawn -np 3 -H localhost:2,node2:2 --ssh node2 "
        "--master-addr vm -- /venv/bin/python -m launch.worker train.py -- --steps 5"]


def test_free_port_is_bindable_and_a_remote_rank_0_is_asked_over_ssh():
    import socket
    port = free_port()
    with socket.socket() as s:
        s.bind(("", port))
    calls = []

    def fake_ssh(argv, **kw):
        import subprocess
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="40123\n", stderr="")
    assert choose_port(W(0, 0, 1, "node2", "ssh"), "/venv/bin/python", "/src", run=fake_ssh) == 40123
    assert calls == [list(free_port_argv(W(0, 0, 1, "node2", "ssh"), "/venv/bin/python", "/src"))]

    def unreachable(argv, **kw):
        import subprocess
        return subprocess.CompletedProcess(argv, 255, stdout="", stderr="ssh: connect to host node2 port 22: No route\n")
    with pytest.raises(ValueError, match="cannot ask node2 for a free port over ssh: ssh: connect to host node2"):
        choose_port(W(0, 0, 1, "node2", "ssh"), "/venv/bin/python", "/src", run=unreachable)


def test_env_from_stdin_becomes_the_worker_with_those_variables(tmp_path):
    """What a remote host runs: the variables arrive on stdin, the worker sees them."""
    import subprocess
    import sys
    from tests.helpers import REPO
    probe = [sys.executable, "-c", "import os; print(os.environ['RANK'], os.environ['DISTRIB_STATUS_SECRET'])"]
    proc = subprocess.run([sys.executable, "-m", "launch.torch_spawn", "--env-from-stdin", *probe], cwd=REPO,
                          input=json.dumps({"RANK": "3", "DISTRIB_STATUS_SECRET": "ab"}) + "\n", capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "3 ab\n"), proc.stderr
