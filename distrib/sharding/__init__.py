"""Sharded data parallelism (ZeRO stages 1 and 2) on either engine: see :mod:`distrib.sharding.update`.

    opt = distrib.wrap(model, torch.optim.AdamW(model.parameters()), ctx, shard="gradients")

``layout`` (who owns which elements: pure), ``reducer`` (stage 2's reduce-scatter), ``optimizer``
(the per-rank shard: step, global norm, allgather, state), ``update`` (the part of the wrapped
optimizer that chooses the reducer and steps the shard).
Checkpoints of sharded state: :mod:`distrib.checkpoint.sharded`.
"""
from distrib.sharding.optimizer import SHARDED_FORMAT, STAGES, SUPPORTED

__all__ = ["SHARDED_FORMAT", "STAGES", "SUPPORTED"]
