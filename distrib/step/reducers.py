"""How gradients travel: the allreduce strategies behind :class:`distrib.step.optim.DistributedOptimizer`.

A reducer is told when a parameter's gradient is final for the step (``grad_ready``), may
start communicating it at once, and on ``synchronize`` leaves every ``param.grad`` holding
the average over all workers. Every rank must call ``grad_ready`` for the same parameters
each step (:class:`distrib.step.gradients.GradientExchange` guarantees it), in any order.

``grad_ready(p, used)`` also says whether ``p`` had a gradient on this rank (``used=False``:
it takes part in the average with zeros). The flags travel with the gradients (one element
per parameter at the end of each bucket, averaged with it), so ``synchronize`` can tell which
parameters no rank used, without a collective of its own: those are not stepped, as in a
single-process run where their ``.grad`` stays ``None``.

On a GPU nothing here may make the host wait for the device (tests/test_step_syncs.py): the
flags are kept on the host and written into the buffer once per bucket without a blocking
copy, and the averaged flags are read back only on a step where this rank left some parameter
without a gradient (a parameter used here was used somewhere, so then nothing needs reading).
"""
from __future__ import annotations

import os
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

DEFAULT_BUCKET_MB = 4.0  # measured in benchmarks/: see benchmarks/results.md


class PerParameterReducer:
    """One ``allreduce_async_`` per gradient, named by parameter.

    On Horovod its background thread fuses the tensors that are ready in the same cycle into its
    fusion buffer; this is what ``hvd.DistributedOptimizer`` does. Adasum takes this path.
    """

    def __init__(self, named_params: List[Tuple[str, torch.Tensor]], comm, *, compression: str, op: str,
                 prefix: str = "distrib"):
        self._comm = comm
        self._params = [p for _, p in named_params]
        self._names = {p: f"{prefix}.grad.{n}" for n, p in named_params}
        self._used_name = f"{prefix}.used"
        self._compress = compression == "fp16"
        self._op = op
        self._inflight: Dict[torch.Tensor, tuple] = {}  # param -> (handle, tensor on the wire)
        self._used: Dict[torch.Tensor, bool] = {}

    def grad_ready(self, p: torch.Tensor, used: bool = True) -> None:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad
        wire = grad.to(torch.float16) if self._compress and grad.is_floating_point() else grad
        handle = self._comm.allreduce_async_(wire, name=self._names[p], op=self._op)
        self._inflight[p] = (handle, wire)
        self._used[p] = used

    def synchronize(self) -> FrozenSet[torch.Tensor]:
        """Wait for every average; return the parameters that no rank used."""
        # Adasum's result is no average, so the flags cannot ride with the gradients: one
        # small extra collective per step, on this (non-default) path only.
        flags = torch.tensor([float(self._used.get(p, False)) for p in self._params], dtype=torch.float64)
        used_anywhere = self._comm.allreduce(flags, name=self._used_name, op="sum")
        for p, (handle, wire) in self._inflight.items():
            handle.wait()
            if wire is not p.grad:
                p.grad.copy_(wire)
        self._inflight.clear()
        unused_here = [p for p in self._params if not self._used.get(p, False)]
        self._used.clear()
        if not unused_here:  # each parameter was used here, so somewhere: nothing to read
            return frozenset()
        return frozenset(p for p, n in zip(self._params, used_anywhere.tolist()) if n == 0)

    def in_flight(self) -> bool:
        return bool(self._inflight)


# -- bucketing: pure functions -------------------------------------------------------------------

def assign_buckets(nbytes: Sequence[int], dtypes: Sequence, cap_bytes: int,
                   first_cap_bytes: Optional[int] = None) -> List[List[int]]:
    """Group parameter indices (in registration order) into buckets, DDP-style.

    Buckets are filled in *reverse* registration order (backward produces the last layers'
    gradients first), one dtype per bucket; a bucket is closed as soon as it holds at least
    ``cap_bytes``, so a parameter larger than the cap gets a bucket of its own (with the small
    ones before it). ``first_cap_bytes``: the cap of the first bucket closed, which DDP keeps
    small (1 MiB) so that communication starts early in backward. Every index appears in
    exactly one bucket.
    """
    if cap_bytes <= 0 or (first_cap_bytes is not None and first_cap_bytes <= 0):
        raise ValueError(f"bucket size must be > 0 bytes, got {cap_bytes} (first bucket: {first_cap_bytes})")
    open_buckets: Dict[object, Tuple[List[int], int]] = {}
    buckets: List[List[int]] = []
    for i in reversed(range(len(nbytes))):
        members, size = open_buckets.get(dtypes[i], ([], 0))
        members, size = members + [i], size + nbytes[i]
        if size >= (first_cap_bytes if first_cap_bytes is not None and not buckets else cap_bytes):
            buckets.append(members)
            open_buckets.pop(dtypes[i], None)
        else:
            open_buckets[dtypes[i]] = (members, size)
    buckets.extend(members for members, _ in open_buckets.values())
    return buckets


def bucket_offsets(numels: Sequence[int]) -> List[int]:
    """Start of each member's slice in its bucket's flat buffer (members packed back to back)."""
    offsets, at = [], 0
    for n in numels:
        offsets.append(at)
        at += n
    return offsets


def bucket_numel(params: Sequence[torch.Tensor]) -> int:
    """Elements of a bucket's buffer: the members' gradients, then one used-flag per member."""
    return sum(p.numel() for p in params) + len(params)


class _Bucket:
    """One flat buffer: the members' gradients back to back, then one used-flag per member.
    ``buffer``: where it lives (a slice of a transport's shared region), else a fresh one."""

    def __init__(self, index: int, params: List[torch.Tensor], buffer: Optional[torch.Tensor] = None):
        self.index = index
        self.params = params
        numels = [p.numel() for p in params]
        total = sum(numels)
        if buffer is None:
            buffer = torch.zeros(total + len(params), dtype=params[0].dtype, device=params[0].device)
        self.buffer = buffer
        self.views = [self.buffer[o:o + n].view_as(p) for p, o, n in zip(params, bucket_offsets(numels), numels)]
        self.used_flags = self.buffer[total:]
        self.used = [False] * len(params)  # the flags on the host, written into used_flags at launch
        self.pending = len(params)
        self.wire: Optional[torch.Tensor] = None
        self.handle = None


class BucketedReducer:
    """Gradients kept in flat per-bucket buffers, each allreduced in place as one tensor.

    ``grad_ready(p)`` moves the gradient into its slot of the bucket buffer (no copy when
    ``p.grad`` already is that slot, e.g. after ``zero_grad(set_to_none=False)``) and points
    ``p.grad`` at the slot, so the averaged result needs no copy back. Buckets are launched in
    a fixed order (bucket 0 holds the last layers, ready first in backward) as soon as they and
    all buckets before them are complete, so communication overlaps the rest of backward and
    every rank issues the same collectives in the same order.

    ``transport`` does the allreduce of one flat buffer (``allreduce_async_``): the engine's
    ``comm`` (one tensor per bucket, so no fusion-buffer copies), or, under Horovod's MPI
    controller, :class:`distrib.comm.horovod.MpiTransport`, which skips Horovod's cycle.
    ``prescale``: divide by the world size on the way into the bucket and allreduce a sum (for
    an engine whose average is a sum followed by a division, ``comm.divides_average``).
    """

    def __init__(self, named_params: List[Tuple[str, torch.Tensor]], comm, *, compression: str = "none",
                 bucket_bytes: int = int(DEFAULT_BUCKET_MB * 2**20), first_bucket_bytes: Optional[int] = None,
                 transport=None, prescale: bool = False, prefix: str = "distrib"):
        params = [p for _, p in named_params]
        self._compress = compression == "fp16"
        groups = assign_buckets([p.numel() * p.element_size() for p in params], [p.dtype for p in params],
                                bucket_bytes, first_bucket_bytes)
        # A transport with a region of its own (shared memory) holds the buckets back to back in it.
        region = transport.region() if hasattr(transport, "region") else None
        # such a transport reduces every bucket at the first wait; the engine's, one after another
        self.completes_in_order = region is None
        self._buckets, at = [], 0
        for i, g in enumerate(groups):
            members = [params[j] for j in g]
            n = bucket_numel(members)
            self._buckets.append(_Bucket(i, members, None if region is None else region[at:at + n]))
            at += n
        self._slot = {p: (b, k) for b in self._buckets for k, p in enumerate(b.params)}
        self._transport = transport if transport is not None else comm
        # prescale: the engine's average would be a sum and then a pass of division in the training
        # thread (Gloo); ask for the sum and divide while copying into the bucket, as DDP's reducer
        # does: one pass over the gradients fewer.
        self._scale = 1.0 / comm.size if prescale and comm.size > 1 else None
        self._op = "sum" if self._scale is not None else "average"
        self._prefix = prefix
        self._next = 0  # first bucket not launched yet

    def grad_ready(self, p: torch.Tensor, used: bool = True) -> None:
        bucket, k = self._slot[p]
        view, grad, scale = bucket.views[k], p.grad, self._scale
        if grad is None:
            view.zero_()
        elif grad.data_ptr() == view.data_ptr():  # accumulated in place (zero_grad(set_to_none=False))
            if scale is not None:
                view.mul_(scale)
        elif scale is not None:
            torch.mul(grad, scale, out=view)
        else:
            view.copy_(grad)
        p.grad = view
        bucket.used[k] = used
        bucket.pending -= 1
        while self._next < len(self._buckets) and self._buckets[self._next].pending == 0:
            self._launch(self._buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        # One write of the host's flags per bucket that does not wait for the device (DDP's
        # reducer does the same): a kernel argument when all agree, else a staged copy.
        if all(bucket.used) or not any(bucket.used):
            bucket.used_flags.fill_(float(bucket.used[0]))
        else:
            bucket.used_flags.copy_(torch.tensor(bucket.used, dtype=bucket.buffer.dtype), non_blocking=True)
        wire = bucket.buffer
        if self._compress and wire.is_floating_point() and wire.dtype != torch.float16:
            wire = wire.to(torch.float16)
        bucket.wire = wire
        bucket.handle = self._transport.allreduce_async_(wire, name=f"{self._prefix}.bucket.{bucket.index}",
                                                         op=self._op)

    def synchronize(self) -> FrozenSet[torch.Tensor]:
        """Wait for every bucket's average; return the parameters that no rank used."""
        self._check_all_launched()
        for bucket in self._buckets:
            self._wait(bucket)
        return self._unused_anywhere(self._buckets)

    def completed_buckets(self) -> Iterator[Tuple[List[torch.Tensor], FrozenSet[torch.Tensor]]]:
        """Wait for the buckets one by one, in launch order; after each, yield its parameters
        (their ``grad`` now the average) and those of them that no rank used. A caller may step
        a bucket's parameters while the later buckets are still on the wire (``completes_in_order``)."""
        self._check_all_launched()
        for bucket in self._buckets:
            self._wait(bucket)
            yield bucket.params, self._unused_anywhere([bucket])

    def _check_all_launched(self) -> None:
        if self._next != len(self._buckets):
            missing = [b.index for b in self._buckets if b.pending]
            raise RuntimeError(f"synchronize() before every gradient was ready (buckets {missing} incomplete)")
        self._next = 0

    @staticmethod
    def _wait(bucket: _Bucket) -> None:
        bucket.handle.wait()
        if bucket.wire is not bucket.buffer:
            bucket.buffer.copy_(bucket.wire)
        bucket.wire = bucket.handle = None
        bucket.pending = len(bucket.params)

    @staticmethod
    def _unused_anywhere(buckets: List[_Bucket]) -> FrozenSet[torch.Tensor]:
        if all(all(b.used) for b in buckets):  # each parameter was used here, so somewhere
            return frozenset()
        # This rank left some parameter without a gradient: whether another rank used it is in the
        # averaged flags. One small device-to-host copy for all of ``buckets``, on such steps only.
        flags = torch.cat([b.used_flags for b in buckets]).tolist()
        members = [p for b in buckets for p in b.params]
        return frozenset(p for p, used in zip(members, flags) if used == 0)

    def in_flight(self) -> bool:
        return any(b.handle is not None for b in self._buckets)

    @property
    def buckets(self) -> List[List[torch.Tensor]]:
        return [b.params for b in self._buckets]

    @property
    def transport(self):
        """What allreduces the buckets: the engine's comm, or a transport of its (shared memory, mpi4py)."""
        return self._transport


def make_reducer(named_params, comm, *, compression: str = "none", op: str = "average",
                 bucket_mb: Optional[float] = None, prefix: str = "distrib"):
    """The reducer for these options: per-parameter allreduce for Adasum (its dot products are
    per tensor), else flat buckets over the engine (``comm``). ``DISTRIB_REDUCER`` forces one
    (``per-parameter``, ``horovod``, ``mpi``: for benchmarks and bisecting); ``DISTRIB_BUCKET_MB``
    sets the bucket size; the engine may want a smaller first bucket (``comm.first_bucket_mb``: the
    torch engine's is DDP's 1 MiB across hosts), ``DISTRIB_FIRST_BUCKET_MB`` sets it (0: none), and
    ``DISTRIB_PRESCALE=0`` turns off the division on the way into the buckets (both for benchmarks
    and bisecting). When every rank is on one host, the torch engine's buckets live in shared
    memory and are summed there (``comm.host_transport``; ``DISTRIB_SHM=0``: Gloo's allreduce).
    ``prefix`` starts every collective's name: unique per wrapped optimizer,
    so that two models trained in one process never send tensors of the same name.
    Must be called on all ranks (the mpi transport dups a communicator).

    The mpi4py transport is not the default: on this 2-core host its blocking, busy-polling
    Allreduce in the training thread measured slower than Horovod's background thread
    (benchmarks/results.md).
    """
    choice = os.environ.get("DISTRIB_REDUCER", "auto")
    if choice not in ("auto", "per-parameter", "horovod", "mpi"):
        raise ValueError(f"DISTRIB_REDUCER={choice!r} is not one of auto, per-parameter, horovod, mpi")
    if op == "adasum" or choice == "per-parameter":
        return PerParameterReducer(named_params, comm, compression=compression, op=op, prefix=prefix)
    if bucket_mb is None:
        bucket_mb = float(os.environ.get("DISTRIB_BUCKET_MB", DEFAULT_BUCKET_MB))
    if bucket_mb <= 0:
        raise ValueError(f"bucket size must be > 0 MB, got {bucket_mb}; try {DEFAULT_BUCKET_MB}")
    transport = None
    if choice == "mpi" and compression == "none":
        transport = comm.mpi_transport() if hasattr(comm, "mpi_transport") else None
    elif choice == "auto" and compression == "none":
        transport = _host_transport(named_params, comm, prefix)
    first_mb = getattr(comm, "first_bucket_mb", None)  # a comm made by hand (tests) may not say
    if "DISTRIB_FIRST_BUCKET_MB" in os.environ:
        first_mb = float(os.environ["DISTRIB_FIRST_BUCKET_MB"])
    prescale = (transport is None and getattr(comm, "divides_average", False)
                and os.environ.get("DISTRIB_PRESCALE", "1") != "0")
    return BucketedReducer(named_params, comm, compression=compression, bucket_bytes=int(bucket_mb * 2**20),
                           first_bucket_bytes=int(first_mb * 2**20) if first_mb else None,
                           transport=transport, prescale=prescale, prefix=prefix)


def _host_transport(named_params, comm, prefix: str):
    """The engine's faster allreduce for this host's layout (shared memory when every rank is on
    one host, :mod:`distrib.comm.shared_memory`), for CPU gradients of one dtype; else None."""
    params = [p for _, p in named_params]
    if (not params or comm.size == 1 or not hasattr(comm, "host_transport")
            or any(p.device.type != "cpu" for p in params) or len({p.dtype for p in params}) != 1):
        return None
    return comm.host_transport(bucket_numel(params), params[0].dtype, name=prefix)  # the buckets, back to back
