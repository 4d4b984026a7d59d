"""The scheduling priority of the threads the collective engine starts (Horovod's background
thread and the MPI or Gloo threads it brings).

Why: Horovod's background thread coordinates with every other rank once per cycle (1 ms) for
as long as the job runs, and it waits for the slowest rank by polling (Open MPI busy-polls even
with ``mpi_yield_when_idle``): measured on 2 hosts of the test cluster, one rank's background
thread used 27-93 % of a core while training was idle. On a CPU-only node the workers' compute
threads already fill the cores (:func:`distrib.context.init` sizes them so), so that polling
takes CPU from the step itself: PowerSGD rank 2 over 1 Gbit/s took 45-122 ms a step on the MLP
and 36-54 ms on the LM, depending on the ranks' phase, and 41-48 / 36-38 ms with the engine's
threads at nice 19 (benchmarks/bench_network.py). At the lowest priority those threads still get
every cycle the computation leaves free, and the computation waits for them at the end of the
step anyway, so their real work (the allreduce itself) loses nothing there.

On a node with a GPU the engine's threads are left alone: the step's compute runs on the device,
and the background thread launching its collectives is latency-critical.

``DISTRIB_COMM_NICE``: the nice value (0-19) for the engine's threads; 0 leaves them as they
are. Default: 19 on a CPU-only node, 0 where CUDA is available.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Set, TypeVar

import torch

T = TypeVar("T")
ENV = "DISTRIB_COMM_NICE"
CPU_DEFAULT = 19


def own_threads() -> Set[int]:
    """The thread ids of this process (empty where ``/proc`` is not there: nothing to lower)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def engine_nice(env: Optional[Mapping[str, str]] = None, cuda: Optional[bool] = None) -> int:
    """The nice value for the engine's threads: ``DISTRIB_COMM_NICE``, else 19 on CPU, 0 with CUDA."""
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
                         f"threads at the lowest priority) or {ENV}=0 (left as they are)")
    return nice


def started_threads_at_nice(start: Callable[[], T], nice: int) -> T:
    """Run ``start()`` (the engine's init) and give the threads it started the nice value ``nice``
    (0: leave them). Only those: the caller's own threads keep their priority."""
    before = own_threads()
    result = start()
    if nice:
        for tid in own_threads() - before:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:  # the thread ended meanwhile
                pass
    return result
