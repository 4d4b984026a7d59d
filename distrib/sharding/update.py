"""``distrib.wrap(..., shard="optimizer" | "gradients")``: ZeRO stages 1 and 2 as a part of the
data-parallel optimizer.

:class:`distrib.step.optim.DistributedOptimizer` is one class whatever the mode; what differs is its
*update* part (how averaged gradients become a step, and which reducer carries them), chosen
before the optimizer's gradient exchange is built. So stage 2 never allocates the full-size
allreduce buckets it does not use, and ``step()`` has no branch on the mode:

- ``"optimizer"`` (stage 1, :class:`ShardedUpdate`): gradients are averaged by the usual bucketed
  allreduce; each rank steps its 1/N of the elements (:class:`~distrib.sharding.optimizer.ZeroShard`)
  and the updated parameters are allgathered.
- ``"gradients"`` (stage 2, :class:`ReduceScatterUpdate`): each bucket is reduce-scattered as
  backward completes it, so a rank keeps only its 1/N of the averaged gradient; then as stage 1.
  With ``accumulate > 1`` the micro-batches' gradients are summed locally at full size first (as
  without sharding), so the gradient memory saving holds between steps, not inside the
  accumulation window.

``state_dict()`` is this rank's shard (``SHARDED_FORMAT``); :class:`distrib.checkpoint.CheckpointManager`
saves one file per rank and re-cuts them for another world size (it recognises a sharded optimizer
by its ``owned_ranges``). ``load_state_dict`` also takes a plain torch optimizer state.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from distrib.step.gradients import SharedStateOnly
from distrib.step.reducers import DEFAULT_BUCKET_MB
from distrib.sharding.optimizer import STAGES, ZeroShard, check_supported
from distrib.sharding.reducer import ReduceScatterReducer

ELASTIC_REFUSAL = ("shard= cannot run under Horovod Elastic: a worker that dies takes its optimizer shard with it "
                   "(no other rank holds a copy), so the survivors cannot rebuild the state in memory; run "
                   "without --elastic (a sharded run resumes from its checkpoints on any number of workers)")


def check_sharding(shard: str, optimizer: torch.optim.Optimizer, ctx, op: str) -> None:
    """Raise ValueError unless ``shard`` (a stage of :data:`STAGES`) applies to this set-up."""
    if shard not in STAGES:
        raise ValueError(f"shard={shard!r} is not one of {', '.join(STAGES)} (or None: no sharding)")
    if ctx.elastic:
        raise ValueError(ELASTIC_REFUSAL)
    if op != "average":
        raise ValueError(f"shard= needs op='average', got op={op!r}: Adasum combines whole "
                         "per-tensor gradients, which a reduce-scatter splits")
    check_supported(optimizer)


def sharded_update(shard: str, optimizer: torch.optim.Optimizer, ctx, *, name: str,
                   named_params: List[Tuple[str, torch.Tensor]], compression: str,
                   make_allreduce: Callable[[], object]) -> "ShardedUpdate":
    """The update part of ``shard`` (checked by :func:`check_sharding`). ``make_allreduce`` builds
    the plain allreduce reducer (stage 1 averages with it). Cuts the optimizer's state: call it
    after rank 0's state was broadcast."""
    bucket_mb = float(os.environ.get("DISTRIB_BUCKET_MB", DEFAULT_BUCKET_MB))
    zero = ZeroShard(optimizer, ctx.comm, ctx.rank, ctx.size, name=f"distrib.{name}.zero",
                     bucket_bytes=int(bucket_mb * 2**20))
    if shard == "optimizer":
        return ShardedUpdate(zero, make_allreduce)
    if {p for _, p in named_params} != {p for p in zero.params if p.requires_grad}:
        raise ValueError("shard='gradients' needs the optimizer to hold exactly the model's trainable "
                         "parameters; use shard='optimizer' for other set-ups")
    return ReduceScatterUpdate(zero, ctx.comm, compression)


class ShardedUpdate(SharedStateOnly):
    """Stage 1: every rank steps the elements it owns, from the allreduced full gradients."""

    shard = "optimizer"

    def __init__(self, zero: ZeroShard, make_reducer: Callable[[], object]):
        self.zero = zero
        self.make_reducer = make_reducer

    def step(self, scaler, max_grad_norm: Optional[float], params) -> Optional[torch.Tensor]:
        """Unscale (fp16), clip by the global norm, step this rank's shard, allgather the
        parameters. Must be called on all ranks; the global norm when clipping, else None."""
        return self.zero.step(self._grad_of, scaler=scaler, max_grad_norm=max_grad_norm)

    def _grad_of(self, bucket: int, piece, t: torch.Tensor) -> Optional[torch.Tensor]:
        g = self.zero.params[piece.index].grad
        return None if g is None else g.reshape(-1)[piece.start:piece.end]

    def state_dict(self) -> Dict:
        return self.zero.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.zero.load_state_dict(state)

    def owned_ranges(self):
        """``(param index, start, end)`` of the elements this rank owns (for resharding)."""
        return self.zero.owned_ranges()

    def gradient_nbytes(self) -> int:
        """Bytes of averaged gradient this rank holds between synchronize() and step()."""
        return sum(p.grad.numel() * p.grad.element_size() for p in self.zero.params if p.grad is not None)


class ReduceScatterUpdate(ShardedUpdate):
    """Stage 2: gradients are reduce-scattered, so each rank only ever holds its chunks of them."""

    shard = "gradients"

    def __init__(self, zero: ZeroShard, comm, compression: str):
        super().__init__(zero, self._reduce_scatter)
        self._comm, self._compression = comm, compression
        self._reducer: Optional[ReduceScatterReducer] = None

    def _reduce_scatter(self) -> ReduceScatterReducer:
        # a new one after every reset() of the exchange (elastic); the step reads the current one
        z = self.zero
        self._reducer = ReduceScatterReducer(z.buckets, [[z.params[i] for i in b.members] for b in z.buckets],
                                             self._comm, name=z.name, compression=self._compression, pool=z.pool)
        return self._reducer

    def step(self, scaler, max_grad_norm: Optional[float], params) -> Optional[torch.Tensor]:
        norm = super().step(scaler, max_grad_norm, params)
        self._reducer.release()
        return norm

    def _grad_of(self, bucket: int, piece, t: torch.Tensor) -> Optional[torch.Tensor]:
        shard = self._reducer.shard(bucket)
        if shard is None or self.zero.params[piece.index] in self._reducer.unused:
            return None
        return shard[piece.at:piece.at + piece.numel]

    def gradient_nbytes(self) -> int:
        held = [s for s in (self._reducer.shard(i) for i in range(len(self.zero.buckets))) if s is not None]
        return super().gradient_nbytes() + sum(t.numel() * t.element_size() for t in held)
