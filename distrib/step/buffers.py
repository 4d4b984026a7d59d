"""Buffers (BatchNorm running statistics) kept equal across ranks, as DDP's ``broadcast_buffers``.

Gradients are averaged, but buffers are not gradients: each rank's BatchNorm updates its
running mean and variance from its own shard, so the ranks' buffers drift apart and the model
rank 0 saves is not the one the others evaluate with. :class:`BufferSync` broadcasts rank 0's
buffers before every training forward pass (grad enabled, ``model.training``). For statistics
over the whole global batch, use :class:`distrib.SyncBatchNorm` instead.
"""
from __future__ import annotations

import torch


class BufferSync:
    """Installs a forward pre-hook on ``model`` that makes every rank's buffers rank 0's.

    The hook runs collectives: every rank must run the same training forward passes.
    """

    def __init__(self, model: torch.nn.Module, comm, *, prefix: str):
        self._comm = comm
        self._buffers = [(name, buf) for name, buf in model.named_buffers() if buf is not None]
        self._prefix = prefix
        self._handle = model.register_forward_pre_hook(self._before_forward) if self._buffers else None

    def _before_forward(self, module: torch.nn.Module, inputs) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self._comm.broadcast_tensors(self._buffers, root=0, prefix=f"{self._prefix}.buffer")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
