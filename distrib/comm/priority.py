"""The scheduling priority of the threads the collective engine starts (Horovod's background
thread and the MPI or Gloo threads it brings), lowered while a step computes with nothing for
them to send.

Why: Horovod's background thread coordinates with every other rank once per cycle (1 ms) for
as long as the job runs, and it waits for the slowest rank by polling (Open MPI busy-polls even
with ``mpi_yield_when_idle``). Measured on 2 hosts of the test cluster: one rank's background
thread used 27-93 % of a core while training was idle, how much depending on the phase between
the ranks' cycles. Where the cores are tight (a CPU-only node whose compute threads fill them)
that polling takes CPU from the step: PowerSGD rank 2 over 1 Gbit/s took 45-122 ms a step on
the MLP and 36-54 ms on the LM from one launch to the next, against 41-48 and 36-38 ms with
the engine's threads at nice 19 for the whole run (benchmarks/bench_network.py). A thread left
at nice 19 for good is starved as soon as other busy processes share the cores (DataLoader
workers, other jobs: measured here under other engineers' load, 37 -> 98 ms on the LM), so the
priority is lowered only between the step's collectives: PowerSGD's reducer raises it back
before its first collective of the step (its collectives all come after backward) and lowers it
once the last one is done (:meth:`distrib.comm.base.Comm.set_engine_priority`).

Raising a thread's priority back needs the right to (root, CAP_SYS_NICE or RLIMIT_NICE >= 20);
without it nothing is lowered at all: a thread that could not be raised back would stay starved.
On a node with a GPU the engine's threads are left alone (their collectives are latency-critical
and the compute runs on the device).

``DISTRIB_COMM_NICE``: the nice value (0-19) for the engine's threads between collectives;
0 leaves them alone. Default: 19 on a CPU-only node, 0 where CUDA is available.
"""
from __future__ import annotations

import os
import resource
from typing import Callable, FrozenSet, Mapping, Optional, Set, Tuple, TypeVar

import torch

T = TypeVar("T")
ENV = "DISTRIB_COMM_NICE"
CPU_DEFAULT = 19


def own_threads() -> Set[int]:
    """The thread ids of this process (empty where ``/proc`` is not there: nothing to change)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def engine_nice(env: Optional[Mapping[str, str]] = None, cuda: Optional[bool] = None) -> int:
    """The nice value for the engine's threads between collectives: ``DISTRIB_COMM_NICE``, else 19 on
    CPU, 0 with CUDA."""
    env = os.environ if env is None else env
    raw = env.get(ENV, "").strip()
    if not raw:
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return 0 if cuda else CPU_DEFAULT
    try:
        nice = int(raw)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise ValueError(f"{ENV}={raw!r} is not a nice value from 0 to 19; set e.g. {ENV}=19 (the engine's "
                         f"threads at the lowest priority while the step computes) or {ENV}=0 (left alone)")
    return nice


def may_raise_back() -> bool:
    """Whether this process may set a thread's nice value back to 0 after raising it (root, or an
    RLIMIT_NICE that allows it; CAP_SYS_NICE without root is not detected: then nothing is lowered)."""
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


def started_threads(start: Callable[[], T]) -> Tuple[T, FrozenSet[int]]:
    """Run ``start()`` (the engine's init); returns its result and the ids of the threads it started."""
    before = own_threads()
    result = start()
    return result, frozenset(own_threads() - before)


def set_nice(threads: FrozenSet[int], nice: int) -> None:
    """Give ``threads`` the nice value ``nice`` (those that ended meanwhile are skipped)."""
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # ended, or (a lower value) not allowed: left as it is
            pass
