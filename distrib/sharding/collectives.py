"""A pool of flat buffers that ZeRO's reduce-scatter and allgather write into (the collectives
themselves are the engine's: ``comm.reducescatter_into_async`` / ``comm.allgather_into_async``).

Buffers allocated per call and freed at ZeRO's sizes (a bucket per call, every step) are what
glibc's heap keeps: its mmap threshold rises to the largest freed block, later blocks of that
size come from the heap, and freed ones stay resident, so the process's peak memory grew by
hundreds of MiB over a few steps (measured with benchmarks/bench_memory.py). Owned buffers,
reused step after step, avoid that on our side.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch


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
