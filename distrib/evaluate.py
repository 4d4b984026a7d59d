"""Distributed evaluation: metrics averaged across ranks, weighted by sample counts."""
from __future__ import annotations

from typing import Callable, Dict, Iterable

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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, metric_fn: Callable, ctx=None) -> Dict[str, float]:
    """Run ``metric_fn(model, batch) -> (dict of per-batch metric *means*, batch size)`` over
    this rank's ``batches`` and average across ranks (over ``ctx.comm`` when given). Must be
    called on all ranks."""
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = {}
    count = 0
    try:
        for batch in batches:
            means, n = metric_fn(model, batch)
            for name, value in means.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            count += n
    finally:
        model.train(was_training)
    return weighted_mean(sums, count, ctx)
