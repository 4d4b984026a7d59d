"""Where a training step's time goes: cheap wall-clock phases, summed per step.

``perf_counter`` around each phase, no device synchronisation: on CPU the time is real; on
GPU pass ``sync=torch.cuda.synchronize`` to charge asynchronous kernels to the right phase
(at the cost of stalling the pipeline, so only when profiling).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, Optional

PHASES = ("data", "compute", "allreduce", "optimizer", "checkpoint")


class PhaseTimer:
    """Accumulates seconds per named phase until :meth:`take` hands them over and resets."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Optional[Callable[[], None]] = None):
        self._clock, self._sync = clock, sync
        self._totals: Dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync:
            self._sync()
        start = self._clock()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self._totals[name] = self._totals.get(name, 0.0) + self._clock() - start

    def take(self) -> Dict[str, float]:
        totals, self._totals = self._totals, {}
        return totals
