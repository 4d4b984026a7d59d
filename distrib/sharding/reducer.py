"""ZeRO stage 2's gradient path: each bucket is reduce-scattered as soon as backward completes it.

Same contract as the reducers of :mod:`distrib.reducers` (``grad_ready``, ``synchronize``,
``in_flight``), but after ``synchronize`` no ``param.grad`` is left: each rank holds only its
chunk of every bucket's averaged gradient (:meth:`ReduceScatterReducer.shard`). Which
parameters no rank used travels in one small allreduce of per-parameter flags, launched with
the last bucket. A bucket's
full-size buffer lives from its first gradient until its reduce-scatter is done; at most
``window`` of them are in flight, so the full gradient never exists at once.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Sequence

import torch

from distrib.sharding.collectives import Pool
from distrib.sharding.layout import Bucket

DEFAULT_WINDOW = 2  # buckets in flight during backward: overlap without holding every buffer


class _Slot:
    def __init__(self, index: int, layout: Bucket, params: List[torch.Tensor]):
        self.index, self.layout, self.params = index, layout, params
        self.pending = len(params)
        self.buffer: Optional[torch.Tensor] = None  # full bucket, padded to size x chunk (pooled)
        self.wire: Optional[torch.Tensor] = None    # what is sent: the buffer, or its fp16 copy
        self.handle = None
        self.out: Optional[torch.Tensor] = None     # this rank's chunk as received (kept between steps)
        self.shard: Optional[torch.Tensor] = None   # ... in the parameters' dtype, once averaged


class ReduceScatterReducer:
    """Average gradients bucket by bucket with the engine's reduce-scatter (``comm``).

    ``buckets`` and ``params_of_bucket`` come from :func:`distrib.sharding.layout.plan`; every
    rank launches the buckets in the same order (bucket 0 first, each as soon as it and all
    before it are complete). ``compression="fp16"`` sends float16 and keeps the result in
    the parameters' dtype. Must be built on all ranks with the same layout.
    """

    def __init__(self, buckets: Sequence[Bucket], params_of_bucket: Sequence[List[torch.Tensor]], comm, *,
                 name: str, compression: str = "none", window: int = DEFAULT_WINDOW, pool: Optional[Pool] = None):
        self._comm, self._name = comm, name
        self._compress = compression == "fp16"
        self._window = max(1, window)
        self._slots = [_Slot(i, b, list(ps)) for i, (b, ps) in enumerate(zip(buckets, params_of_bucket))]
        self._where: Dict[torch.Tensor, tuple] = {}
        for slot in self._slots:
            for p, offset, numel in zip(slot.params, slot.layout.offsets, slot.layout.numels):
                self._where[p] = (slot, offset, numel)
        self._next = 0          # first bucket not launched yet
        self._inflight: List[_Slot] = []
        self._params = [p for s in self._slots for p in s.params]
        self._used = [False] * len(self._params)  # on the host: sent as one tensor with the last bucket
        self._flag = {p: i for i, p in enumerate(self._params)}
        self._used_handle = None
        self.unused: FrozenSet[torch.Tensor] = frozenset()
        # at most window + 1 bucket buffers of each size exist; shared with the optimizer's
        # allgather (a padded bucket is also the size of its allgather result)
        self._pool = pool if pool is not None else Pool()

    def grad_ready(self, p: torch.Tensor, used: bool = True) -> None:
        """Move ``p.grad`` into its bucket (``p.grad`` becomes None; no gradient counts as zeros);
        launch the buckets that are complete."""
        slot, offset, numel = self._where[p]
        if slot.buffer is None:
            slot.buffer = self._pool.take(slot.layout.chunk * slot.layout.size, p.dtype, p.device)
            slot.buffer[slot.layout.total:].zero_()  # the padding must average to zero
        if p.grad is not None:
            slot.buffer[offset:offset + numel].copy_(p.grad.reshape(-1))
        else:  # no gradient on this rank: zeros in the average
            slot.buffer[offset:offset + numel].zero_()
        p.grad = None  # the full-size gradient is not kept: only the bucket copy, until it is sent
        self._used[self._flag[p]] = used
        slot.pending -= 1
        while self._next < len(self._slots) and self._slots[self._next].pending == 0:
            self._launch(self._slots[self._next])
            self._next += 1
        if self._next == len(self._slots) and self._used_handle is None:
            flags = torch.tensor(self._used, dtype=torch.float64)
            self._used_handle = self._comm.allreduce_async_(flags, name=f"{self._name}.used", op="sum")

    def _launch(self, slot: _Slot) -> None:
        wire = slot.buffer
        if self._compress and wire.dtype != torch.float16:
            wire = wire.to(torch.float16)
            self._pool.give(slot.buffer)  # the fp16 copy is what travels
            slot.buffer = None
        if slot.out is None or slot.out.dtype != wire.dtype:
            slot.out = torch.empty(slot.layout.chunk, dtype=wire.dtype, device=wire.device)
        slot.wire = wire
        slot.handle = self._comm.reducescatter_into_async(wire, slot.out, name=f"{self._name}.rs.{slot.index}")
        self._inflight.append(slot)
        while len(self._inflight) > self._window:
            self._finish(self._inflight.pop(0))

    def _finish(self, slot: _Slot) -> None:
        slot.handle.wait()
        dtype = slot.params[0].dtype
        slot.shard = slot.out if slot.out.dtype == dtype else slot.out.to(dtype)
        if slot.buffer is not None:
            self._pool.give(slot.buffer)
        slot.buffer = slot.wire = slot.handle = None

    def synchronize(self) -> FrozenSet[torch.Tensor]:
        """Wait for every bucket's reduce-scatter; return the parameters that no rank used (their
        pieces are not stepped). Must be called on all ranks after every gradient of the step
        was handed to :meth:`grad_ready`."""
        if self._next != len(self._slots):
            missing = [s.index for s in self._slots if s.pending]
            raise RuntimeError(f"synchronize() before every gradient was ready (buckets {missing} incomplete)")
        while self._inflight:
            self._finish(self._inflight.pop(0))
        for slot in self._slots:
            slot.pending = len(slot.params)
        self._next = 0
        used = self._used_handle.wait() if self._used_handle is not None else None
        self._used_handle = None
        if all(self._used) or used is None:  # each parameter was used here, so somewhere: nothing to read
            self.unused = frozenset()
        else:
            self.unused = frozenset(p for p, n in zip(self._params, used.tolist()) if n == 0)
        return self.unused

    def in_flight(self) -> bool:
        return bool(self._inflight) or self._used_handle is not None

    def shard(self, bucket: int) -> Optional[torch.Tensor]:
        """This rank's chunk of bucket ``bucket``'s averaged gradient (None before the first step)."""
        return self._slots[bucket].shard

    def release(self) -> None:
        """Forget the gradient shards (after the optimizer step). Their buffers are kept for the
        next step: they are this rank's 1/N of the gradient, the memory stage 2 keeps."""
        for slot in self._slots:
            slot.shard = None

    @property
    def buckets(self) -> List[List[torch.Tensor]]:
        return [s.params for s in self._slots]
