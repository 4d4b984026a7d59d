"""Distributed evaluation: metrics averaged across ranks, weighted by sample counts."""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch

from distrib.context import import_horovod
from distrib.heartbeat import beat


def weighted_mean(sums: Dict[str, float], count: int) -> Dict[str, float]:
    """Global mean of each metric: ``sums`` are this rank's metric totals over ``count`` samples.

    Ranks may hold different numbers of samples (evaluation shards are not padded), so
    the mean is sum of sums over sum of counts, not the mean of the ranks' means. A rank with
    no samples (more ranks than evaluation batches) knows no metric names: the names are agreed
    first, and its sums count as zeros. Must be called on all ranks.
    """
    hvd = import_horovod()
    beat()  # before every collective distrib runs: see distrib/heartbeat.py
    names = sorted(set().union(*hvd.allgather_object(sorted(sums), name="distrib.evaluate.names")))
    local = torch.tensor([float(sums.get(n, 0.0)) for n in names] + [float(count)], dtype=torch.float64)
    total = hvd.allreduce(local, op=hvd.Sum, name="distrib.evaluate.weighted_mean")
    if total[-1] == 0:
        raise ValueError("no evaluation samples on any rank; check the evaluation data")
    return {n: float(total[i] / total[-1]) for i, n in enumerate(names)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, metric_fn: Callable) -> Dict[str, float]:
    """Run ``metric_fn(model, batch) -> (dict of per-batch metric *means*, batch size)`` over
    this rank's ``batches`` and average across ranks. Must be called on all ranks."""
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
    return weighted_mean(sums, count)
