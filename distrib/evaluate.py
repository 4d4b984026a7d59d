"""Distributed evaluation: metrics averaged across ranks, weighted by sample counts.

Device placement: the loaders (``ShardedLoader``, ``eval_loader``, any ``DataLoader``) yield
batches on the host, as torch's do; :func:`evaluate` moves each batch to the device of the
model's parameters before it calls ``metric_fn``, so a metric function written on a CPU machine
runs unchanged on a GPU. In the training step the loop moves the batch itself
(``x.to(ctx.device, non_blocking=True)``), where it can overlap the copy with compute.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Union

import torch

from distrib.comm import joined


def weighted_mean(sums: Dict[str, float], count: int, ctx=None) -> Dict[str, float]:
    """Global mean of each metric: ``sums`` are this rank's metric totals over ``count`` samples.

    Ranks may hold different numbers of samples (evaluation shards are not padded), so
    the mean is sum of sums over sum of counts, not the mean of the ranks' means. A rank with
    no samples (more ranks than evaluation batches) knows no metric names: the names are agreed
    first, and its sums count as zeros. Must be called on all ranks. The collectives go through
    ``ctx.comm`` when given, else through the world this process joined.
    """
    comm = ctx.comm if ctx is not None else joined()
    names = sorted(set().union(*comm.allgather_object(sorted(sums), name="distrib.evaluate.names")))
    local = torch.tensor([float(sums.get(n, 0.0)) for n in names] + [float(count)], dtype=torch.float64)
    total = comm.allreduce(local, op="sum", name="distrib.evaluate.weighted_mean")
    if total[-1] == 0:
        raise ValueError("no evaluation samples on any rank; check the evaluation data")
    return {n: float(total[i] / total[-1]) for i, n in enumerate(names)}


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside tuples, lists and dicts) on ``device``;
    anything else is returned as it is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, metric_fn: Callable, ctx=None) -> Dict[str, float]:
    """Run ``metric_fn(model, batch) -> (dict of per-batch metric *means*, batch size)`` over
    this rank's ``batches`` and average across ranks (over ``ctx.comm`` when given). Each batch is
    moved to the device of the model's parameters first (:func:`to_device`). Metric values may be
    tensors: they are summed on the device and read once at the end, not once per batch. Must be
    called on all ranks."""
    was_training = model.training
    first = next(model.parameters(), None)
    device = first.device if first is not None else None  # a model without parameters: batches as they are
    model.eval()
    sums: Dict[str, Union[float, torch.Tensor]] = {}
    count = 0
    try:
        for batch in batches:
            means, n = metric_fn(model, batch if device is None else to_device(batch, device))
            for name, value in means.items():
                value = value.detach().to(torch.float64) if torch.is_tensor(value) else float(value)
                sums[name] = sums.get(name, 0.0) + value * n
            count += n
    finally:
        model.train(was_training)
    return weighted_mean(sums, count, ctx)
