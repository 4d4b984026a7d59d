"""Command line -> one frozen :class:`LaunchConfig`.

    python -m launch -np 2 train.py --my-args
    python -m launch -H node1:4,node2:4 --controller gloo train.py
    python -m launch --hostfile hosts.txt --max-restarts 3 --hang-timeout 300 train.py

Every user error becomes one line ``distrib-launch: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional, Sequence, Tuple

from launch.hosts import Hosts, format_hosts, parse_host_list, read_hostfile, total_slots
from launch.slurm_env import hosts_from_slurm, in_slurm_job

PROG = "distrib-launch"
CONTROLLERS = ("auto", "mpi", "gloo")
MIN_HANG_TIMEOUT_S = 3.0  # heartbeats are rate-limited to one per second


@dataclass(frozen=True)
class LaunchConfig:
    """Everything the launcher decided from the command line; validated on construction."""
    script: str
    script_args: Tuple[str, ...]
    np: int
    hosts: Hosts
    controller: str = "auto"
    dry_run: bool = False
    verbose: bool = False
    timeline: Optional[str] = None
    max_restarts: int = 0
    hang_timeout: Optional[float] = None
    failure_grace: float = 3.0  # seconds the job gets to end by itself after a rank failed
    stop_grace: float = 5.0     # seconds between SIGTERM and SIGKILL when stopping workers

    def __post_init__(self) -> None:
        if not self.script:
            raise ValueError("no training script given; usage: distrib-launch -np N script.py [args]")
        if not self.hosts:
            raise ValueError("no hosts; give -H host:slots or --hostfile FILE, or leave both out for localhost")
        if self.np < 1:
            raise ValueError(f"-np {self.np} is not a number of workers; give -np 1 or more")
        slots = total_slots(self.hosts)
        if self.np > slots:
            raise ValueError(f"-np {self.np} is more than the {slots} slots of {format_hosts(self.hosts)}; "
                             f"lower -np to {slots} or give the hosts more slots")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"--controller {self.controller!r} is unknown; use one of {', '.join(CONTROLLERS)}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts {self.max_restarts} is negative; give 0 (no restart) or more")
        if self.hang_timeout is not None and not self.hang_timeout >= MIN_HANG_TIMEOUT_S:
            raise ValueError(f"--hang-timeout {self.hang_timeout:g} is too short; give at least "
                             f"{MIN_HANG_TIMEOUT_S:g} seconds (longer than the slowest step or checkpoint)")
        for name in ("failure_grace", "stop_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} is negative; give 0 or more seconds")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``distrib-launch: error: MESSAGE`` (one line) and exit 2."""
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Start N Horovod workers running script.py and supervise them.",
                usage="%(prog)s [-np N] [-H HOSTS | --hostfile FILE] [options] script.py [args ...]")
    p.add_argument("-np", "--num-proc", dest="np", type=int, metavar="N",
                   help="number of workers (default: all slots of -H/--hostfile; required without them)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", dest="hosts", metavar="HOSTS", help="host:slots,host2:slots")
    where.add_argument("--hostfile", metavar="FILE", help="lines 'host:slots' or 'host slots=N'; # comments")
    p.add_argument("--controller", choices=CONTROLLERS, default="auto",
                   help="Horovod controller; auto: MPI when Horovod was built with it, else Gloo")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit without running it")
    p.add_argument("--verbose", action="store_true", help="say more about what the launcher does")
    p.add_argument("--timeline", metavar="FILE", help="write a Horovod timeline (HOROVOD_TIMELINE) to FILE")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="after a failure, stop everything and run the whole job again, up to K times")
    p.add_argument("--hang-timeout", type=float, metavar="SECONDS",
                   help="treat a rank as hung when its heartbeat (distrib.heartbeat.beat) is this old")
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def config_from_args(argv: Sequence[str]) -> LaunchConfig:
    """Parse ``argv``; on a user error print one line and exit 2."""
    args = build_parser().parse_args(list(argv))
    try:
        if args.hosts is not None:
            hosts = parse_host_list(args.hosts)
        elif args.hostfile is not None:
            hosts = read_hostfile(args.hostfile)
        elif args.np is None and in_slurm_job():
            hosts = tuple(hosts_from_slurm())  # inside a SLURM allocation: its nodes and slots
        elif args.np is None:
            raise ValueError("-np is required without -H/--hostfile (outside a SLURM allocation); e.g. -np 2")
        else:
            hosts = (("localhost", max(args.np, 1)),)
        if not os.path.isfile(args.script):
            raise ValueError(f"script {args.script!r} not found (from {os.getcwd()}); give the path of the "
                             f"training script")
        return LaunchConfig(
            script=args.script, script_args=tuple(args.script_args),
            np=args.np if args.np is not None else total_slots(hosts), hosts=hosts,
            controller=args.controller, dry_run=args.dry_run, verbose=args.verbose,
            timeline=os.path.abspath(args.timeline) if args.timeline else None,
            max_restarts=args.max_restarts, hang_timeout=args.hang_timeout)
    except ValueError as exc:
        fail(str(exc))
