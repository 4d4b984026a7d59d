"""How gradients travel: the allreduce strategies behind :class:`distrib.optim.DistributedOptimizer`.

A reducer is told when a parameter's gradient is final for the step (``grad_ready``), may
start communicating it at once, and on ``synchronize`` leaves every ``param.grad`` holding
the average over all workers. Every rank must call ``grad_ready`` for the same parameters
each step (the optimizer guarantees it), in any order.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch


class PerParameterReducer:
    """One Horovod ``allreduce_async_`` per gradient, named by parameter.

    Horovod's background thread fuses the tensors that are ready in the same cycle into its
    fusion buffer; this is what ``hvd.DistributedOptimizer`` does.
    """

    def __init__(self, named_params: List[Tuple[str, torch.Tensor]], hvd, *, compression: str, op: str):
        self._hvd = hvd
        self._names = {p: f"grad.{n}" for n, p in named_params}
        self._compress = compression == "fp16"
        self._op = hvd.Adasum if op == "adasum" else hvd.Average
        self._inflight: Dict[torch.Tensor, tuple] = {}  # param -> (handle, tensor on the wire)

    def grad_ready(self, p: torch.Tensor) -> None:
        grad = p.grad
        wire = grad.to(torch.float16) if self._compress and grad.is_floating_point() else grad
        handle = self._hvd.allreduce_async_(wire, name=self._names[p], op=self._op)
        self._inflight[p] = (handle, wire)

    def synchronize(self) -> None:
        for p, (handle, wire) in self._inflight.items():
            self._hvd.synchronize(handle)
            if wire is not p.grad:
                p.grad.copy_(wire)
        self._inflight.clear()

    def in_flight(self) -> bool:
        return bool(self._inflight)


def make_reducer(named_params, hvd, *, compression: str = "none", op: str = "average"):
    return PerParameterReducer(named_params, hvd, compression=compression, op=op)
