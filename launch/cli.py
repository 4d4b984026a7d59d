"""Command line -> one frozen :class:`LaunchConfig`.

    python -m launch -np 2 train.py --my-args
    python -m launch -H node1:4,node2:4 --controller gloo train.py
    python -m launch --hostfile hosts.txt --max-restarts 3 --hang-timeout 300 train.py
    python -m launch --engine torch -np 2 train.py     # torch.distributed workers, no Horovod

Every user error becomes one line ``distrib-launch: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional, Sequence, Tuple

from launch.hosts import Hosts, format_hosts, is_local, local_names, parse_host_list, read_hostfile, total_slots
from launch.slurm_env import hosts_from_slurm, in_slurm_job
from launch.version import distrib_version

PROG = "distrib-launch"
CONTROLLERS = ("auto", "mpi", "gloo")
ENGINES = ("horovod", "torch")  # horovod: through mpirun/horovodrun; torch: torch.distributed, started by us
MIN_HANG_TIMEOUT_S = 3.0  # heartbeat counts reach the file once a second


@dataclass(frozen=True)
class LaunchConfig:
    """Everything the launcher decided from the command line; validated on construction."""
    script: str
    script_args: Tuple[str, ...]
    np: int
    hosts: Hosts
    controller: str = "auto"
    engine: str = "horovod"
    dry_run: bool = False
    verbose: bool = False
    timeline: Optional[str] = None
    max_restarts: int = 0
    hang_timeout: Optional[float] = None
    failure_grace: float = 3.0  # seconds the job gets to end by itself after a rank failed
    stop_grace: float = 5.0     # seconds between SIGTERM and SIGKILL when stopping workers
    # Horovod Elastic (--elastic): the world may shrink to min_np and grow to max_np.
    elastic: bool = False
    min_np: Optional[int] = None
    max_np: Optional[int] = None
    discovery_script: Optional[str] = None  # the user's; else one is generated from the hosts
    network_interface: Optional[str] = None
    blacklist_cooldown: Optional[Tuple[int, int]] = None
    reset_limit: Optional[int] = None

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
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine!r} is unknown; use one of {', '.join(ENGINES)}")
        if self.engine == "torch":
            self._check_torch()
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts {self.max_restarts} is negative; give 0 (no restart) or more")
        if self.hang_timeout is not None and not self.hang_timeout >= MIN_HANG_TIMEOUT_S:
            raise ValueError(f"--hang-timeout {self.hang_timeout:g} is too short; give at least "
                             f"{MIN_HANG_TIMEOUT_S:g} seconds (longer than the slowest step or checkpoint)")
        for name in ("failure_grace", "stop_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} is negative; give 0 or more seconds")
        if self.elastic:
            self._check_elastic()
        elif (self.min_np, self.max_np, self.discovery_script, self.blacklist_cooldown, self.reset_limit) != \
                (None,) * 5:
            raise ValueError("--min-np, --max-np, --host-discovery-script, --blacklist-cooldown and "
                             "--reset-limit only apply with --elastic; add --elastic")

    def _check_torch(self) -> None:
        # Horovod Elastic re-forms the world inside the job; a torch.distributed process group
        # cannot be re-formed that way here, so a lost worker means a restart of the whole job.
        if self.elastic:
            raise ValueError("--elastic runs on Horovod Elastic only; with --engine torch use --max-restarts K "
                             "(the whole job restarts and resumes from its last checkpoint)")
        if self.controller != "auto":
            raise ValueError(f"--controller {self.controller} picks Horovod's controller and does not apply to "
                             "--engine torch (torch.distributed uses Gloo on CPU, NCCL on GPU); drop it")
        if self.timeline:
            raise ValueError("--timeline writes a Horovod timeline and does not apply to --engine torch; drop it "
                             "(torch.profiler in the script records one)")

    def _check_elastic(self) -> None:
        if self.controller == "mpi":
            raise ValueError("--elastic needs Horovod's Gloo controller (Horovod Elastic does not run on MPI); "
                             "drop --controller mpi")
        if self.max_restarts:
            raise ValueError("--elastic and --max-restarts exclude each other: elastic mode recovers "
                             "inside the job; pick one")
        if self.min_np is None or self.max_np is None:
            raise ValueError("--elastic needs --min-np and --max-np (the smallest and largest world)")
        if not 1 <= self.min_np <= self.np <= self.max_np:
            raise ValueError(f"need 1 <= --min-np ({self.min_np}) <= -np ({self.np}) <= --max-np "
                             f"({self.max_np}); adjust them")
        if self.blacklist_cooldown is not None:
            low, high = self.blacklist_cooldown
            if not 0 < low <= high:
                raise ValueError(f"--blacklist-cooldown {low},{high}: give MIN,MAX seconds with 0 < MIN <= MAX")
        if self.reset_limit is not None and self.reset_limit < 1:
            raise ValueError(f"--reset-limit {self.reset_limit}: give 1 or more")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse names the problem ("invalid int value: 'two'"); add the fix.
        if "invalid int value" in message:
            message += "; give a whole number, e.g. 2"
        elif "invalid float value" in message:
            message += "; give a number of seconds, e.g. 60"
        else:
            message += f"; see {PROG} --help"
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``distrib-launch: error: MESSAGE`` (one line) and exit 2."""
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Start N workers (Horovod or torch.distributed) running script.py and supervise them.",
                usage="%(prog)s [-np N] [-H HOSTS | --hostfile FILE] [options] script.py [args ...]")
    p.add_argument("--version", action="version", version=f"%(prog)s {distrib_version()}")
    p.add_argument("-np", "--num-proc", dest="np", type=int, metavar="N",
                   help="number of workers (default: all slots of -H/--hostfile; required without them)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", dest="hosts", metavar="HOSTS", help="host:slots,host2:slots")
    where.add_argument("--hostfile", metavar="FILE", help="lines 'host:slots' or 'host slots=N'; # comments")
    p.add_argument("--engine", choices=ENGINES, default="horovod",
                   help="horovod (default): Horovod's allreduce, started by mpirun or horovodrun; torch: "
                        "torch.distributed (Gloo on CPU, NCCL on GPU), each worker started by the launcher "
                        "with torchrun's variables; needs no Horovod")
    p.add_argument("--controller", choices=CONTROLLERS, default="auto",
                   help="Horovod controller; auto: MPI when Horovod was built with it, else Gloo")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit without running it")
    p.add_argument("--verbose", action="store_true", help="say more about what the launcher does")
    p.add_argument("--timeline", metavar="FILE", help="write a Horovod timeline (HOROVOD_TIMELINE) to FILE")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="after a failure, stop everything and run the whole job again, up to K times")
    p.add_argument("--hang-timeout", type=float, metavar="SECONDS",
                   help="treat a rank as hung when its heartbeat count (distrib.watch.heartbeat.beat) has not "
                        "moved for this long")
    elastic = p.add_argument_group("elastic mode (Horovod Elastic, Gloo controller)")
    elastic.add_argument("--elastic", action="store_true",
                         help="keep training when workers die or come back (the script uses distrib.elastic)")
    elastic.add_argument("--min-np", type=int, metavar="A", help="smallest world the job continues with")
    elastic.add_argument("--max-np", type=int, metavar="B", help="largest world the job grows to")
    elastic.add_argument("--host-discovery-script", dest="discovery_script", metavar="S",
                         help="prints the available 'host:slots' lines; default: generated from -H/--hostfile")
    elastic.add_argument("--network-interface", metavar="IF",
                         help="interface for Gloo (default: lo when every host is this machine)")
    elastic.add_argument("--blacklist-cooldown", metavar="MIN,MAX",
                         help="seconds before a failed host may rejoin (exponential back-off); default: never")
    elastic.add_argument("--reset-limit", type=int, metavar="N", help="at most N re-formations of the world")
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
        elif args.discovery_script is not None:
            hosts = discovered_hosts(args.discovery_script)
        elif args.np is None and in_slurm_job():
            hosts = tuple(hosts_from_slurm())  # inside a SLURM allocation: its nodes and slots
        elif args.np is None:
            raise ValueError("-np is required without -H/--hostfile (outside a SLURM allocation); e.g. -np 2")
        else:
            hosts = (("localhost", max(args.np, 1)),)
        if args.discovery_script is not None and not os.access(args.discovery_script, os.X_OK):
            raise ValueError(f"--host-discovery-script {args.discovery_script!r} is not an executable file; "
                             "chmod +x it or give its path")
        if args.timeline:
            _check_timeline(args.timeline, hosts)
        if not os.path.isfile(args.script):
            raise ValueError(f"script {args.script!r} not found (from {os.getcwd()}); give the path of the "
                             f"training script")
        return LaunchConfig(
            script=args.script, script_args=tuple(args.script_args),
            np=args.np if args.np is not None else _default_np(args, hosts), hosts=hosts,
            controller=args.controller, engine=args.engine, dry_run=args.dry_run, verbose=args.verbose,
            timeline=os.path.abspath(args.timeline) if args.timeline else None,
            max_restarts=args.max_restarts, hang_timeout=args.hang_timeout,
            elastic=args.elastic, min_np=args.min_np, max_np=args.max_np,
            discovery_script=os.path.abspath(args.discovery_script) if args.discovery_script else None,
            network_interface=args.network_interface,
            blacklist_cooldown=_parse_cooldown(args.blacklist_cooldown), reset_limit=args.reset_limit)
    except ValueError as exc:
        fail(str(exc))


def discovered_hosts(script: str) -> Hosts:
    """The hosts the discovery script lists now (horovodrun keeps asking it during the run)."""
    try:
        out = subprocess.run([os.path.abspath(script)], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError(f"--host-discovery-script {script!r} failed ({exc}); it must print 'host:slots' lines "
                         "and exit 0") from None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--host-discovery-script {script!r} listed no host; it must print 'host:slots' lines")
    return parse_host_list(",".join(lines))


def _check_timeline(path: str, hosts: Hosts) -> None:
    """Horovod opens the timeline on rank 0's host (the first host) and, when it cannot,
    runs on without one and says nothing: check the folder when that host is this one."""
    folder = os.path.dirname(os.path.abspath(path))
    if hosts and is_local(hosts[0][0], local_names()) and not os.path.isdir(folder):
        raise ValueError(f"--timeline {path}: folder {folder} does not exist; create it or give a file in an "
                         "existing folder")


def _default_np(args, hosts: Hosts) -> int:
    """Without -np: every slot of the hosts; elastic with a discovery script starts at --min-np."""
    if args.discovery_script is not None:
        return args.min_np or 1
    return total_slots(hosts)


def _parse_cooldown(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--blacklist-cooldown {text!r}: give MIN,MAX seconds, e.g. 10,60") from None
    return low, high
