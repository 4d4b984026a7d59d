"""Which rank owns which elements: the flat, balanced partition behind ZeRO stages 1 and 2.

Pure functions (no Horovod, no ranks), tested directly. The optimizer's parameters are grouped
into buckets (one dtype and one param group per bucket, filled in reverse registration order as
backward produces them, the same rule as the allreduce buckets); each bucket is one flat range of
elements, its members packed back to back, padded to a multiple of the world size and cut into
``size`` equal chunks. Rank r owns chunk r of every bucket, so every rank owns 1/N of the
elements (+ at most ``size - 1`` padding elements per bucket) and a bucket's gradient is one
reduce-scatter. A parameter may straddle two ranks: the optimizers allowed here
(:data:`distrib.sharding.optimizer.SUPPORTED`) update each element on its own, so a slice of
a parameter steps exactly like the same elements of the whole.

A *piece* is the part of one parameter inside one rank's chunk. Pieces are keyed by the
parameter's position in the optimizer's ``param_groups`` (torch's own ``state_dict`` ids), so
a checkpoint written at one world size can be cut again at another (DCP's global offsets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from distrib.reducers import assign_buckets, bucket_offsets


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, end)`` of parameter ``index`` (flattened), at ``at`` in its rank's chunk."""
    index: int
    start: int
    end: int
    at: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Bucket:
    """Parameters ``members`` (optimizer indices) packed back to back, cut into ``size`` chunks."""
    members: Tuple[int, ...]
    numels: Tuple[int, ...]
    size: int

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def chunk(self) -> int:
        """Elements per rank: the bucket rounded up to a multiple of ``size``, divided by it."""
        return -(-self.total // self.size)

    @property
    def offsets(self) -> List[int]:
        return bucket_offsets(self.numels)

    def pieces(self, rank: int) -> List[Piece]:
        """The pieces of rank ``rank``'s chunk, in bucket order (possibly none: padding only)."""
        lo = rank * self.chunk
        hi = min(lo + self.chunk, self.total)
        out = []
        for index, offset, numel in zip(self.members, self.offsets, self.numels):
            start, end = max(lo, offset), min(hi, offset + numel)
            if start < end:
                out.append(Piece(index, start - offset, end - offset, start - lo))
        return out


def plan(numels: Sequence[int], keys: Sequence, element_sizes: Sequence[int], size: int,
         bucket_bytes: int, indices: Optional[Sequence[int]] = None) -> List[Bucket]:
    """The buckets of parameters ``indices`` (default ``0..len(numels)-1``; optimizer order),
    whose sizes are ``numels``. ``keys[i]`` must be equal for parameters that may share a
    bucket (dtype and param group)."""
    if size < 1:
        raise ValueError(f"world size must be >= 1, got {size}")
    indices = list(range(len(numels))) if indices is None else list(indices)
    groups = assign_buckets([n * s for n, s in zip(numels, element_sizes)], list(keys), bucket_bytes)
    return [Bucket(tuple(indices[i] for i in g), tuple(numels[i] for i in g), size) for g in groups]


def owned(buckets: Sequence[Bucket], rank: int) -> List[Tuple[int, int, int]]:
    """``(index, start, end)`` of every element range rank ``rank`` owns, in bucket order."""
    return [(p.index, p.start, p.end) for b in buckets for p in b.pieces(rank)]
