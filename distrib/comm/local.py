"""The one-process engine: a world of one worker, where every collective is the identity.

Serves single-process use of distrib's parts (a Context built by hand, tests) without any
engine started. Collectives still beat the heartbeat and honour the latch, as on every engine.
"""
from __future__ import annotations

from distrib.comm.base import Comm, done


class LocalComm(Comm):
    engine = "local"
    controller = "none"
    supports_adasum = True  # Adasum of one worker's gradient is that gradient

    rank = property(lambda self: 0)
    size = property(lambda self: 1)
    local_rank = property(lambda self: 0)
    local_size = property(lambda self: 1)
    cross_rank = property(lambda self: 0)
    cross_size = property(lambda self: 1)

    def _allreduce(self, tensor, name, op):
        return tensor.clone()

    def _allreduce_async_(self, tensor, name, op):
        return done(self, tensor)

    def _reducescatter_into_async(self, tensor, out, name):
        out.copy_(tensor.reshape(out.shape))
        return done(self, out)

    def _allgather_into_async(self, tensor, out, name):
        out.copy_(tensor.reshape(out.shape))
        return done(self, out)

    def _broadcast_async_(self, tensor, root, name):
        return done(self, tensor)

    def _broadcast_object(self, obj, root, name):
        return obj

    def _allgather_object(self, obj, name):
        return [obj]

    def _barrier(self, name):
        return None
