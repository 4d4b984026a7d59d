"""BatchNorm whose batch statistics are those of the global batch (all ranks' shards).

With a few samples per worker, per-worker batch statistics are noisy and differ from what one
process would compute on the whole global batch. :class:`SyncBatchNorm` allreduces the
per-channel sums during the forward pass (``comm.allreduce`` is differentiable on every engine,
so the backward pass gets the global batch's gradient too). Horovod's own ``hvd.SyncBatchNorm``
needs CUDA-only kernels (``batch_norm_stats``); this one is plain tensor arithmetic and runs
on CPU and GPU. Costs two small allreduces per layer per training forward.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from distrib.comm import joined


class SyncBatchNorm(_BatchNorm):
    """Drop-in for ``BatchNorm1d/2d/3d`` in data-parallel training. Every rank must run the
    same training forward passes (each one is a collective). In eval mode, or when not
    training on several workers, it is the ordinary batch norm. Its collectives go through
    ``comm`` (``distrib.wrap()`` hands it the Context's for every layer of the model it wraps),
    else through the world this process joined."""

    comm = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        comm = self.comm if self.comm is not None else joined()
        if not self.training or comm.size == 1:
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // input.size(1)], dtype=input.dtype, device=input.device)
        sums = comm.allreduce(torch.cat([input.sum(dims), count]), op="sum", name="distrib.syncbn.sums")
        n = sums[-1]
        mean = sums[:-1] / n
        centered = input - mean.view(shape)
        # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2: no cancellation.
        var = comm.allreduce((centered * centered).sum(dims), op="sum", name="distrib.syncbn.var") / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * (n / max(float(n) - 1, 1.0))
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        out = centered / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @classmethod
    def convert(cls, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with every BatchNorm layer replaced by a SyncBatchNorm holding the same
        parameters and statistics (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``)."""
        converted = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert(child))
        return converted
