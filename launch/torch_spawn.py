"""``python -m launch.torch_spawn``: one attempt's torch-engine workers, started and waited for.

    python -m launch.torch_spawn -np 4 -H node1:2,node2:2 --ssh node2 --master-addr node1 -- \\
        /venv/bin/python -m launch.worker train.py -- --steps 5

The supervisor (launch/supervise.py) runs this command for ``--engine torch`` where it runs
mpirun or horovodrun for Horovod, once per attempt, and watches the workers through their shims'
reports as usual. This process does what mpirun does for its workers:

- picks ``MASTER_PORT``: a port free on rank 0's host now (over ssh when that host is another);
- starts the workers of this host as its children, each with its torchrun variables
  (launch/torch_plan.py), those of other hosts through ``ssh host 'cd CWD && exec ...'``,
  their environment written to ssh's stdin (``--env-from-stdin``, below), never on a command line,
  and those of other nodes of our Slurm allocation as srun steps (srun passes the environment);
- when a worker fails, stops the others (SIGTERM, SIGKILL after ``DISTRIB_STOP_GRACE`` seconds)
  and exits with the failed worker's code; on SIGTERM or SIGINT, stops them all the same.
  Workers on other hosts are stopped by their shims when the supervisor ends the attempt (the
  status channel closes); ending their ssh client here does not reach them (srun does pass on
  the SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from launch.hosts import parse_host_list
from launch.status_channel import RESTART_COUNT_ENV, STOP_GRACE_ENV
from launch.torch_plan import (TorchWorker, forwarded_env, free_port_argv, layout, ssh_argv, srun_argv,
                               worker_env)

POLL_S = 0.1
DEFAULT_STOP_GRACE_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``OPTIONS -- WORKER_ARGV``: the worker's own ``--`` (before the script's flags) stays in it."""
    if "--" not in argv:
        raise SystemExit("usage: python -m launch.torch_spawn OPTIONS -- python -m launch.worker script.py ...")
    cut = list(argv).index("--")
    return list(argv[:cut]), list(argv[cut + 1:])


def parse_options(options: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.torch_spawn")
    p.add_argument("-np", type=int, required=True)
    p.add_argument("-H", dest="hosts", required=True)
    p.add_argument("--ssh", default="", help="the hosts of -H reached over ssh, comma-separated")
    p.add_argument("--srun", default="", help="the hosts of -H started as srun steps, comma-separated")
    p.add_argument("--master-addr", required=True)
    return p.parse_args(list(options))


def free_port() -> int:
    """A TCP port free on this host now; what FREE_PORT_SNIPPET prints on a remote rank 0's host."""
    with socket.socket() as s:
        s.bind(("", 0))  # no SO_REUSEADDR: see torch_plan.FREE_PORT_SNIPPET
        return s.getsockname()[1]


def choose_port(rank0: TorchWorker, python: str, cwd: str,
                run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """A port free on rank 0's host; raises ValueError with the reason when that host does not answer."""
    if not rank0.remote:
        return free_port()
    what = f"cannot ask {rank0.host} for a free port over {rank0.via}"
    try:
        proc = run(list(free_port_argv(rank0, python, cwd)), stdin=subprocess.DEVNULL, capture_output=True,
                   text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"{what}: {exc}") from None
    answer = proc.stdout.strip()
    if proc.returncode != 0 or not answer.isdigit():
        reason = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise ValueError(f"{what}: {reason[0]}")
    return int(answer)


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Workers:
    """The attempt's worker processes: local shims, and ssh clients for the remote ones."""

    def __init__(self, workers: Sequence[TorchWorker], worker_argv: Sequence[str], env: Mapping[str, str],
                 master_addr: str, master_port: int):
        self.workers, self.procs = tuple(workers), []
        world = len(workers)
        remote_env = forwarded_env(env)
        for w in workers:
            variables = worker_env(w, world, master_addr, master_port)
            if w.via == "srun":
                proc = subprocess.Popen(list(srun_argv(w.host, os.getcwd(), worker_argv)), env={**env, **variables},
                                        stdin=subprocess.DEVNULL)
            elif w.via == "ssh":
                proc = subprocess.Popen(list(ssh_argv(w.host, worker_argv[0], os.getcwd(), worker_argv)),
                                        stdin=subprocess.PIPE)
                try:
                    proc.stdin.write(json.dumps({**remote_env, **variables}).encode() + b"\n")
                    proc.stdin.close()
                except OSError:  # ssh is gone already: its exit code tells
                    pass
            else:
                proc = subprocess.Popen(list(worker_argv), env={**env, **variables}, stdin=subprocess.DEVNULL)
            self.procs.append(proc)

    def first_failure(self) -> Optional[Tuple[TorchWorker, int]]:
        """The first worker (in rank order) seen ended with a non-zero code, and that code."""
        for w, p in zip(self.workers, self.procs):
            code = p.poll()
            if code is not None and code != 0:
                return w, exit_code(code)
        return None

    def all_succeeded(self) -> bool:
        return all(p.poll() == 0 for p in self.procs)

    def stop(self, grace: float) -> None:
        """SIGTERM (and SIGCONT) to every worker still running, SIGKILL after ``grace`` seconds."""
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def say(message: str) -> None:
    sys.stderr.write(f"distrib-launch: {message}\n")
    sys.stderr.flush()


def run(options: argparse.Namespace, worker_argv: Sequence[str], env: Mapping[str, str]) -> int:
    via = {**{h: "ssh" for h in options.ssh.split(",") if h}, **{h: "srun" for h in options.srun.split(",") if h}}
    workers = layout(parse_host_list(options.hosts), options.np, via)
    try:
        grace = float(env.get(STOP_GRACE_ENV) or DEFAULT_STOP_GRACE_S)
    except ValueError:
        grace = DEFAULT_STOP_GRACE_S
    caught: List[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in STOP_SIGNALS}
    # The supervisor forwards SIGUSR2 to the shims itself (to those of other hosts over the status
    # channel: an ssh client does not pass a signal on); here it must not end the attempt.
    previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        try:
            port = choose_port(workers[0], worker_argv[0], os.getcwd())
        except ValueError as exc:
            say(str(exc))
            return 1
        say(f"attempt {env.get(RESTART_COUNT_ENV, '0')}: torch workers meet at "
            f"MASTER_ADDR={options.master_addr} MASTER_PORT={port}")
        procs = Workers(workers, worker_argv, env, options.master_addr, port)
        while True:
            if caught:
                procs.stop(grace)
                return 128 + caught[0]
            failed = procs.first_failure()
            if failed is not None:
                procs.stop(grace)
                return failed[1]
            if procs.all_succeeded():
                return 0
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exec_with_env_from_stdin(argv: Sequence[str]) -> None:
    """On a remote host: read one JSON line of variables from stdin, add them, become ``argv``."""
    os.environ.update(json.loads(sys.stdin.readline() or "{}"))
    os.execvp(argv[0], list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--env-from-stdin"]:
        exec_with_env_from_stdin(argv[1:])
    options, worker_argv = split_argv(argv)
    return run(parse_options(options), worker_argv, os.environ)


if __name__ == "__main__":
    sys.exit(main())
