"""``--engine torch``: LaunchConfig -> the workers to start and the exact command for each; pure.

With the torch engine there is no mpirun or horovodrun: the launcher starts each worker itself,
as torchrun does, one per slot, filling the hosts in the order given. A worker learns its place
from the variables torchrun defines (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) plus ``DISTRIB_ENGINE=torch``, which
``distrib.init()`` reads to pick torch.distributed (Gloo on CPU, NCCL on GPU).

The plan's command is ``python -m launch.torch_spawn`` (launch/torch_spawn.py), one process per
attempt that plays mpirun's part: it picks ``MASTER_PORT`` free on rank 0's host at that moment
(so a restart never meets the previous attempt's port, still in TIME_WAIT), starts the workers
of this host directly and those of other hosts over ssh, or, for the nodes of the Slurm
allocation the launcher runs in, with ``srun`` (as mpirun starts its daemons there: clusters
without ssh between nodes work), and stops the rest when one fails.
Every function here is a pure function of its arguments, so the command lines are golden-tested
(tests/test_launch_torch_plan.py) with the port as a parameter.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Sequence, Tuple

from launch.cli import LaunchConfig
from launch.hosts import SSH_OPTIONS, Hosts, format_hosts, is_local
from launch.plan import EXPORT_NAMES, NOT_EXPORTED, Plan, Tools

ENGINE_ENV = "DISTRIB_ENGINE"
# Set for each worker; never copied from the launcher's own environment.
TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   ENGINE_ENV)
# What a remote worker gets from the launcher's environment (a local one inherits all of it):
# the names mpirun forwards for Horovod, and the knobs of Gloo, NCCL and torch.
FORWARDED_PREFIXES = ("DISTRIB_", "NCCL_", "GLOO_", "TORCH_", "HOROVOD_")
SPAWN_MODULE = "launch.torch_spawn"
# Every worker on this machine: no network needed, and nothing depends on how its name resolves.
LOOPBACK = "127.0.0.1"


# How a worker is started: as a child of launch.torch_spawn, over ssh, or as an srun step.
VIA = ("local", "ssh", "srun")


@dataclass(frozen=True)
class TorchWorker:
    rank: int
    local_rank: int
    local_world_size: int
    host: str
    via: str = "local"

    @property
    def remote(self) -> bool:
        return self.via != "local"


def start_via(hosts: Hosts, local: FrozenSet[str], slurm_nodes: FrozenSet[str]) -> Dict[str, str]:
    """host -> how its workers start: ``local`` for this machine, ``srun`` for another node of the
    Slurm allocation we run in (``slurm_nodes``; empty outside one), else ``ssh``."""
    return {name: "local" if is_local(name, local) else "srun" if name in slurm_nodes else "ssh"
            for name, _ in hosts}


def layout(hosts: Hosts, np: int, via: Mapping[str, str]) -> Tuple[TorchWorker, ...]:
    """``np`` workers over ``hosts``, each host filled to its slots before the next (mpirun's
    ``--map-by slot``, Horovod's host assignment); ``via``: host -> how to start it (default local)."""
    workers, left = [], np
    for host, slots in hosts:
        here = min(slots, left)
        workers += [TorchWorker(rank=len(workers) + i, local_rank=i, local_world_size=here, host=host,
                                via=via.get(host, "local")) for i in range(here)]
        left -= here
    if left:
        raise ValueError(f"-np {np} is more than the {np - left} slots of {format_hosts(hosts)}")
    return tuple(workers)


def master_address(workers: Sequence[TorchWorker], this_host: str) -> str:
    """Where every worker finds rank 0's rendezvous (its TCPStore): loopback when all run here,
    else rank 0's host as the user named it, or this host's name when that was a loopback alias
    (``-H localhost:2,node2:2``: node2 cannot reach our ``localhost``)."""
    first = workers[0]
    if not any(w.remote for w in workers):
        return LOOPBACK
    if not first.remote and is_local(first.host, frozenset()):
        return this_host
    return first.host


def worker_env(worker: TorchWorker, world_size: int, master_addr: str, master_port: int) -> Dict[str, str]:
    """The variables that make a process a torch-engine worker (torchrun's, and the engine)."""
    return {"RANK": str(worker.rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(worker.local_rank),
            "LOCAL_WORLD_SIZE": str(worker.local_world_size), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port), ENGINE_ENV: "torch"}


def forwarded_env(env: Mapping[str, str]) -> Dict[str, str]:
    """The part of the launcher's environment a remote worker gets (sorted by name)."""
    return {name: env[name] for name in sorted(env)
            if (name in EXPORT_NAMES or name.startswith(FORWARDED_PREFIXES))
            and name not in NOT_EXPORTED and name not in TORCH_VARIABLES}


def ssh_argv(host: str, python: str, cwd: str, worker_argv: Sequence[str], ssh: str = "ssh") -> Tuple[str, ...]:
    """ssh to ``host``, into ``cwd``, running ``worker_argv`` with the environment that
    :mod:`launch.torch_spawn` writes to ssh's stdin as one JSON line (``--env-from-stdin``):
    on the command line the status channel's secret would be readable by anyone on that host (ps)."""
    remote = f"cd {shlex.quote(cwd)} && exec {shlex.join([python, '-m', SPAWN_MODULE, '--env-from-stdin', *worker_argv])}"
    return (ssh, *SSH_OPTIONS, host, remote)


def srun_argv(host: str, cwd: str, worker_argv: Sequence[str]) -> Tuple[str, ...]:
    """One task on ``host`` as a step of the allocation; srun passes it our environment (the
    worker's variables included) and, when ended, its signals. ``--overlap``: the workers of one
    node are steps of their own, and must not wait for each other's CPUs."""
    return ("srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--overlap", "--mpi=none",
            "--kill-on-bad-exit=1", f"--chdir={cwd}", *worker_argv)


def free_port_argv(worker: TorchWorker, python: str, cwd: str) -> Tuple[str, ...]:
    """Ask rank 0's host, another one, for a TCP port free there now."""
    probe = (python, "-c", FREE_PORT_SNIPPET)
    if worker.via == "srun":
        return srun_argv(worker.host, cwd, probe)
    return ("ssh", *SSH_OPTIONS, worker.host, shlex.join(probe))


# bind(0) without SO_REUSEADDR: the kernel never hands out a port that any socket holds, one in
# TIME_WAIT included, so each attempt gets a port the previous one is not still closing.
FREE_PORT_SNIPPET = ("import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")


def spawn_args(config: LaunchConfig, local: FrozenSet[str], this_host: str,
               slurm_nodes: FrozenSet[str] = frozenset()) -> Tuple[str, ...]:
    """The options of ``python -m launch.torch_spawn`` for ``config`` (before its ``--``)."""
    via = start_via(config.hosts, local, slurm_nodes)
    workers = layout(config.hosts, config.np, via)
    started = [w.host for w in workers]
    options = []
    for how in ("ssh", "srun"):
        hosts = [name for name, _ in config.hosts if via[name] == how and name in started]
        if hosts:
            options += [f"--{how}", ",".join(hosts)]
    return ("-np", str(config.np), "-H", format_hosts(config.hosts), *options,
            "--master-addr", master_address(workers, this_host))


def build_torch_plan(config: LaunchConfig, *, tools: Tools, local: FrozenSet[str], this_host: str,
                     slurm_nodes: FrozenSet[str] = frozenset()) -> Plan:
    """The command that starts ``config``'s torch-engine workers, for one attempt; ``slurm_nodes``:
    the nodes of the Slurm allocation the launcher runs in (empty outside one)."""
    if config.engine != "torch":
        raise AssertionError("build_torch_plan is for --engine torch")
    # "--" before the script's flags, as in the Horovod plans: the shim drops it.
    worker = (tools.python, "-m", "launch.worker", config.script, "--", *config.script_args)
    argv = (tools.python, "-m", SPAWN_MODULE, *spawn_args(config, local, this_host, slurm_nodes), "--", *worker)
    return Plan(controller="torch", reason="torch.distributed, each worker started by distrib-launch",
                argv=argv, engine="torch")
