"""``distrib.wrap(..., shard="optimizer" | "gradients")``: ZeRO stages 1 and 2 on the data-parallel optimizer.

The training-loop API is :class:`distrib.optim.DistributedOptimizer`'s (backward, synchronize,
step, zero_grad, accumulate, precision, max_grad_norm); only what happens to the gradients and
the step differs:

- ``"optimizer"`` (stage 1): gradients are averaged by the usual allreduce; each rank steps
  its 1/N of the elements (:class:`~distrib.sharding.optimizer.ZeroShard`) and the updated
  parameters are allgathered.
- ``"gradients"`` (stage 2): each bucket is reduce-scattered as backward completes it, so a rank
  keeps only its 1/N of the averaged gradient; then as stage 1. With ``accumulate > 1`` the
  micro-batches' gradients are summed locally at full size first (as without sharding), so the
  gradient memory saving holds between steps, not inside the accumulation window.
"""
from __future__ import annotations

import os

from distrib.optim import DistributedOptimizer
from distrib.reducers import DEFAULT_BUCKET_MB
from distrib.sharding.optimizer import STAGES, ZeroShard, check_supported
from distrib.sharding.reducer import ReduceScatterReducer

ELASTIC_REFUSAL = ("shard= cannot run under Horovod Elastic: a worker that dies takes its optimizer shard with it "
                   "(no other rank holds a copy), so the survivors cannot rebuild the state in memory; run "
                   "without --elastic (a sharded run resumes from its checkpoints on any number of workers)")


class ShardedOptimizer(DistributedOptimizer):
    """A :class:`DistributedOptimizer` whose optimizer state (and, for ``"gradients"``, averaged
    gradient) is split across the ranks. Build it through ``distrib.wrap(..., shard=...)``, on
    all ranks. ``state_dict()`` is this rank's shard (``SHARDED_FORMAT``);
    :class:`distrib.checkpoint.CheckpointManager` saves one file per rank and re-cuts them for
    another world size. ``load_state_dict`` also takes a plain torch optimizer state."""

    def __init__(self, model, optimizer, ctx, *, shard: str, **options):
        if shard not in STAGES:
            raise ValueError(f"shard={shard!r} is not one of {', '.join(STAGES)} (or None: no sharding)")
        if ctx.elastic:
            raise ValueError(ELASTIC_REFUSAL)
        if options.get("op", "average") != "average":
            raise ValueError(f"shard= needs op='average', got op={options['op']!r}: Adasum combines whole "
                             "per-tensor gradients, which a reduce-scatter splits")
        check_supported(optimizer)
        super().__init__(model, optimizer, ctx, **options)
        self.shard = shard
        bucket_mb = float(os.environ.get("DISTRIB_BUCKET_MB", DEFAULT_BUCKET_MB))
        self._zero = ZeroShard(optimizer, self._comm, ctx.rank, ctx.size, name=f"distrib.{self.name}.zero",
                               bucket_bytes=int(bucket_mb * 2**20))
        if shard == "gradients":
            exchanged = {p for _, p in self._exchange.named_params}
            if exchanged != {p for p in self._zero.params if p.requires_grad}:
                raise ValueError("shard='gradients' needs the optimizer to hold exactly the model's trainable "
                                 "parameters; use shard='optimizer' for other set-ups")
            # The exchange (pass counting, used flags, misuse errors) stays; only its reducer
            # changes, now and after every reset(). The allreduce buckets it built are dropped.
            self._exchange.use_reducer(self._stage2_reducer)

    def _stage2_reducer(self) -> ReduceScatterReducer:
        z = self._zero
        return ReduceScatterReducer(z.buckets, [[z.params[i] for i in b.members] for b in z.buckets], self._comm,
                                    name=z.name, compression=self._exchange.compression, pool=z.pool)

    def step(self, closure=None):
        """Synchronize (unless done), then unscale (fp16), clip by the global norm, step this
        rank's shard and allgather the parameters. Must be called on all ranks."""
        if closure is not None:
            raise ValueError("closures are not supported: a closure would re-run backward after the reduction")
        self._exchange.synchronize()
        if self.shard == "gradients":
            reducer = self._exchange.reducer
            params = self._zero.params

            def grad_of(bucket, piece, t):
                shard = reducer.shard(bucket)
                if shard is None or params[piece.index] in reducer.unused:
                    return None
                return shard[piece.at:piece.at + piece.numel]
        else:
            def grad_of(bucket, piece, t):
                g = self._zero.params[piece.index].grad
                return None if g is None else g.reshape(-1)[piece.start:piece.end]
        norm = self._zero.step(grad_of, scaler=self.scaler, max_grad_norm=self.max_grad_norm)
        if norm is not None:
            self.last_grad_norm = norm
        if self.shard == "gradients":
            self._exchange.reducer.release()
        self._exchange.end_step()
        return None

    def state_dict(self):
        state = self._zero.state_dict()
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        self._zero.load_state_dict({k: v for k, v in state.items() if k != "grad_scaler"})
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def gradient_nbytes(self) -> int:
        """Bytes of averaged gradient this rank holds between synchronize() and step(): full
        ``param.grad`` buffers (stage 1) or its chunks of the buckets (stage 2)."""
        held = [p.grad for p in self._zero.params if p.grad is not None]
        if self.shard == "gradients":
            reducer = self._exchange.reducer
            held += [s for s in (reducer.shard(i) for i in range(len(self._zero.buckets))) if s is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def owned_ranges(self):
        """``(param index, start, end)`` of the elements this rank owns (for resharding)."""
        return self._zero.owned_ranges()
