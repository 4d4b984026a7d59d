"""The gradient allreduce of workers that share one host, through shared memory.

Gloo has no shared-memory transport: on one host its allreduce goes through loopback TCP, each
byte copied into the kernel and out again on every hop of the ring (2 workers, 16.8 MB: 12.2 ms;
the same sum through one shared mapping: 4.0 ms; benchmarks/results.md has the step-level ratio).
NCCL and Open MPI use shared memory between the ranks of a host; this is that, for the torch
engine's CPU gradients, where every rank is on the same host (``comm.cross_size == 1``).

One file in ``/dev/shm``, mapped by every rank and unlinked as soon as all have mapped it (nothing
is left behind, whatever way the job ends), holds::

    [ input of rank 0 | input of rank 1 | ... | result A | result B | arrival counters ]

A rank's gradient buckets *are* its input region (:meth:`SharedMemoryTransport.region`), so
autograd's gradients are copied once, into the bucket, as on every other path. One reduction of
the range the buckets filled:

1. every rank has written its input (barrier 1);
2. rank ``r`` sums its ``1/size`` slice of every input into the result buffer (divides it, for an
   average), in rank order, so every rank gets the same bits (barrier 2);
3. every rank copies the whole result into its own input, i.e. its ``param.grad`` views.

The result buffer alternates between A and B from one reduction to the next, so a fast rank's
next step 2 never writes where a slow rank's step 3 still reads: two barriers per step, not three.

The barriers are counters in the mapping, one per rank, each written only by its rank, that the
others poll. That is correct where stores become visible in program order (x86-64's TSO); on
other machines the barriers are the engine's own (``comm.barrier``), which cost ~0.2 ms each here
against ~1 µs. Communication is not overlapped with backward: the whole reduction runs when the
first handle is waited for (the optimizer's ``synchronize``). On one host the ranks' backward
passes and the reduction share the same cores, so overlap would buy nothing (measured for the
first bucket on Gloo: benchmarks/results.md).
"""
from __future__ import annotations

import logging
import mmap
import os
import platform
import time
import uuid
from typing import List, Optional

import numpy as np
import torch

from distrib.comm.base import Comm, Handle

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ALIGN_BYTES = 64               # each region starts on its own cache line
WAIT_TIMEOUT_S = 1800.0        # Gloo's default collective timeout: a peer that never arrives
SPIN_S = 2e-3                  # poll with sched_yield this long, then sleep between polls
SLEEP_S = 100e-6
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")


def _aligned(numel: int, element_size: int) -> int:
    per_line = max(1, ALIGN_BYTES // element_size)
    return -(-numel // per_line) * per_line


def slice_bounds(start: int, end: int, parts: int, element_size: int) -> List[int]:
    """``parts + 1`` boundaries splitting ``[start, end)`` into nearly equal, cache-line aligned
    slices (the last ones may be empty): slice ``r`` is rank ``r``'s share of the sum."""
    per_line = max(1, ALIGN_BYTES // element_size)
    lines = -(-(end - start) // per_line)
    bounds = [min(end, start + (lines * r // parts) * per_line) for r in range(parts)]
    return bounds + [end]


class SharedMemoryTransport:
    """Allreduce of flat buffers carved from :meth:`region`, for ranks on one host.

    ``allreduce_async_`` takes the buckets in order (each must start where the previous one
    ended) and returns a handle; the first ``wait()`` reduces every bucket not reduced yet in one
    go. Build it with :meth:`open` on every rank: it returns None on every rank when any rank
    cannot map the file, and the caller keeps the engine's own allreduce.
    """

    def __init__(self, comm: Comm, mapping: mmap.mmap, numel: int, dtype: torch.dtype, name: str):
        self._comm, self._mapping, self._name = comm, mapping, name
        size, element = comm.size, torch.empty((), dtype=dtype).element_size()
        self._stride = _aligned(numel, element)
        self._element = element
        self._numel = numel
        flat = torch.frombuffer(mapping, dtype=dtype, count=self._stride * (size + 2))
        self._inputs = [flat[r * self._stride:r * self._stride + numel] for r in range(size)]
        self._results = [flat[(size + k) * self._stride:(size + k) * self._stride + numel] for k in range(2)]
        counters_at = self._stride * (size + 2) * element
        self._arrived = np.frombuffer(mapping, dtype=np.int64, count=size * 8, offset=counters_at)[::8]
        self._barriers = 0        # barriers this rank has passed
        self._reductions = 0      # picks result A or B
        self._launched = 0        # end of the buckets handed to allreduce_async_, not yet reduced
        self._reduced = 0         # end of the range reduced so far in this round
        self._op = "average"      # of the buckets launched in this round

    # -- set-up (collective) --------------------------------------------------------------------
    @classmethod
    def open(cls, comm: Comm, numel: int, dtype: torch.dtype, *, name: str) -> Optional["SharedMemoryTransport"]:
        """Map one shared file for ``numel`` elements per rank on every rank, or None on every
        rank with the reason logged (no ``/dev/shm``, too little room in it, another host)."""
        element = torch.empty((), dtype=dtype).element_size()
        nbytes = _aligned(numel, element) * element * (comm.size + 2) + comm.size * 8 * 8
        path, problem = None, None
        if comm.rank == 0:
            path, problem = _create(nbytes)
        path, problem = comm.broadcast_object((path, problem), name=f"{name}.shm.path")
        mapping = None
        if path is not None:
            mapping, problem = _map(path, nbytes)
        problems = comm.allgather_object(problem, name=f"{name}.shm.mapped")
        if comm.rank == 0 and path is not None:
            os.unlink(path)  # every rank has mapped it (or given up): the memory lives as long as the mappings
        problems = [p for p in problems if p]
        if problems:
            if mapping is not None:
                mapping.close()
            if comm.rank == 0:
                log.warning("distrib: gradients go through the engine's allreduce, not shared memory: %s",
                            problems[0])
            return None
        return cls(comm, mapping, numel, dtype, name)

    def region(self) -> torch.Tensor:
        """This rank's input: the flat storage the reducer carves its buckets from."""
        return self._inputs[self._comm.rank]

    # -- the allreduce ---------------------------------------------------------------------------
    def allreduce_async_(self, buf: torch.Tensor, *, name: str, op: str = "average") -> Handle:
        if op not in ("average", "sum"):
            raise ValueError(f"the shared-memory allreduce sums or averages, got op={op!r}")
        start = (buf.data_ptr() - self.region().data_ptr()) // self._element
        if start == 0:
            self._launched = self._reduced = 0  # a new round of buckets
        if start != self._launched or start + buf.numel() > self._numel:
            raise ValueError(f"{name}: buffers must be handed over in order, each where the last ended "
                             f"(expected element {self._launched}, got {start})")
        self._launched = start + buf.numel()
        self._op = op
        self._comm._start(lambda: None, call=("allreduce", name, buf))  # heartbeat and latch
        return Handle(self._comm, lambda: self._reduce_launched(buf))

    def _reduce_launched(self, buf: torch.Tensor) -> torch.Tensor:
        if self._reduced < self._launched:
            self._reduce(self._reduced, self._launched, self._op)
            self._reduced = self._launched
        return buf

    def _reduce(self, start: int, end: int, op: str) -> None:
        rank, size = self._comm.rank, self._comm.size
        result = self._results[self._reductions % 2]
        self._reductions += 1
        bounds = slice_bounds(start, end, size, self._element)
        lo, hi = bounds[rank], bounds[rank + 1]
        self._barrier()                   # 1: every input is written
        if hi > lo:
            mine = result[lo:hi]
            torch.add(self._inputs[0][lo:hi], self._inputs[1][lo:hi], out=mine)
            for other in self._inputs[2:]:
                mine.add_(other[lo:hi])
            if op == "average":
                mine.mul_(1.0 / size)
        self._barrier()                   # 2: every slice is summed
        self._inputs[rank][start:end].copy_(result[start:end])

    def _barrier(self) -> None:
        self._barriers += 1
        if not ORDERED_STORES:
            self._comm.barrier(name=f"{self._name}.shm.barrier")
            return
        target = self._barriers
        self._arrived[self._comm.rank] = target
        began = time.monotonic()
        while self._arrived.min() < target:
            waited = time.monotonic() - began
            if waited < SPIN_S:
                os.sched_yield()
            elif waited < WAIT_TIMEOUT_S:
                time.sleep(SLEEP_S)
            else:
                late = [r for r, n in enumerate(self._arrived.tolist()) if n < target]
                raise RuntimeError(f"{self._name}: ranks {late} did not reach the shared-memory allreduce in "
                                   f"{WAIT_TIMEOUT_S:.0f} s; a worker hung or died (see the launcher's report)")

    def close(self) -> None:
        self._inputs = self._results = []
        self._arrived = None
        try:
            self._mapping.close()
        except BufferError:  # a tensor view still points into it: the mapping goes with the last one
            pass


def _create(nbytes: int):
    """Make the shared file at full size (so a full /dev/shm fails here, not with SIGBUS later)."""
    if not os.path.isdir(SHM_DIR):
        return None, f"{SHM_DIR} does not exist"
    path = os.path.join(SHM_DIR, f"distrib-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return None, f"cannot create {path}: {exc}"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        return None, f"{SHM_DIR} has no room for {nbytes / 2**20:.0f} MiB ({exc}); set DISTRIB_SHM=0 to silence this"
    os.close(fd)
    return path, None


def _map(path: str, nbytes: int):
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:  # another host, or another /dev/shm (a container per rank)
        return None, f"rank cannot open {path}: {exc}"
    try:
        if os.fstat(fd).st_size != nbytes:
            return None, f"{path} has {os.fstat(fd).st_size} bytes, expected {nbytes}"
        return mmap.mmap(fd, nbytes), None
    finally:
        os.close(fd)


__all__ = ["SharedMemoryTransport", "slice_bounds"]
