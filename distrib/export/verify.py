"""Measurements that decide whether an export is written: logit differences, held-out loss, and
CPU latency of two runners timed side by side (alternating, so machine load hits both alike)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

Runner = Callable[[torch.Tensor], torch.Tensor]


def max_abs_diff(exported: Runner, reference: Runner, batches: Sequence[torch.Tensor]) -> float:
    """The largest |logit difference| between two runners over ``batches``."""
    worst = 0.0
    for idx in batches:
        got, want = exported(idx), reference(idx)
        if got.shape != want.shape:
            return float("inf")
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def mean_loss(runner: Runner, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Cross-entropy per token of next-character prediction over ``windows`` ([n, seq + 1])."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        logits = runner(chunk[:, :-1]).float()
        targets = chunk[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count


def side_by_side_ms(runners: Dict[str, Runner], batch: torch.Tensor, rounds: int = 20, warmup: int = 3
                    ) -> Dict[str, float]:
    """Median milliseconds per call of each runner on ``batch``, the runners taking turns."""
    for _ in range(warmup):
        for run in runners.values():
            run(batch)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(batch)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}
