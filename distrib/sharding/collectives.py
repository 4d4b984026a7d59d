"""Reduce-scatter and allgather into buffers we own, and a pool of such buffers.

Horovod's public ``reducescatter_async``/``allgather_async`` allocate a new output tensor per call,
in Horovod's background thread. At ZeRO's sizes (a bucket per call, every step) that churn is
what glibc's heap keeps: its mmap threshold rises to the largest freed block, later blocks of
that size come from the heap, and freed ones stay resident, so the process's peak memory grew
by hundreds of MiB over a few steps (measured with benchmarks/bench_memory.py). Passing outputs
that already have the right size makes Horovod's resize a no-op: no allocation at all.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch


def reducescatter_into(hvd, tensor: torch.Tensor, out: torch.Tensor, name: str):
    """Start averaging ``tensor`` over all ranks; this rank's equal part lands in ``out``
    (``tensor.numel() // world`` elements). Returns a handle for ``hvd.synchronize``."""
    from horovod.torch import mpi_ops
    return mpi_ops._reducescatter_async(tensor, out, name, hvd.Average, mpi_ops.global_process_set, 1.0, 1.0)


def allgather_into(hvd, tensor: torch.Tensor, out: torch.Tensor, name: str):
    """Start concatenating every rank's ``tensor`` (same size everywhere) into ``out``."""
    from horovod.torch import mpi_ops
    return mpi_ops._allgather_async(tensor, out, name, mpi_ops.global_process_set)


class Pool:
    """Flat buffers by (size, dtype, device), handed out and given back: a bounded set of
    buffers is reused step after step instead of allocated and freed."""

    def __init__(self):
        self._free: Dict[Tuple[int, torch.dtype, torch.device], List[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, zero: bool = False) -> torch.Tensor:
        free = self._free.get((numel, dtype, device))
        if free:
            buf = free.pop()
            return buf.zero_() if zero else buf
        return (torch.zeros if zero else torch.empty)(numel, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        self._free.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)

    def clear(self) -> None:
        self._free.clear()
