"""Is one rank persistently slower than its peers? (pure; the times come from distrib/watch/heartbeat.py)

Every rank reports, per window of steps (the same steps on every rank), the milliseconds per step
it spent in each phase of its own work: data, compute, optimizer, checkpoint and "other" (host
time outside the named phases). The time spent waiting for the peers (the gradient allreduce) is
left out: in a synchronous job the fast ranks wait for the slow one, so their steps are as long as
its steps, and only the work before the wait tells them apart.

A rank is slow in a window when its work exceeds ``ratio`` times the median of its peers' (and by
``min_excess_ms``, so that sub-millisecond steps do not flag noise); it is a straggler once it
was slow in ``windows`` of its last ``windows + 1`` windows, the last one included (one window
disturbed by other work on a shared host neither flags a rank nor hides a slow one). The phase named is the one with the largest excess
over the peers' median. One report per rank.
"""
from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from typing import Deque, Dict, List, Mapping, Optional

RATIO = 1.25
WINDOWS = 3
MIN_EXCESS_MS = 1.0
KEPT_WINDOWS = 8  # windows waiting for a rank that stopped reporting: only the newest are kept


@dataclass(frozen=True)
class Straggler:
    rank: int
    step: int                 # the end of the window that made it a straggler
    phase: str                # its slowest phase, relative to the peers
    phase_ms: float           # that phase, ms per step, in the last window
    peers_phase_ms: float     # the peers' median of that phase
    ratio: float              # its work per step over the peers' median, in the last window
    first_step: int           # the first step of the slow windows

    def describe(self, host: Optional[str] = None) -> str:
        where = f" on {host}" if host else ""
        return (f"rank {self.rank}{where} is a straggler: {self.ratio:.2f}x its peers' work per step over steps "
                f"{self.first_step}-{self.step}; slowest phase {self.phase}: {self.phase_ms:.1f} ms/step against "
                f"{self.peers_phase_ms:.1f} ms on the others")

    def as_event(self, host: Optional[str] = None) -> dict:
        return {"rank": self.rank, "host": host, "phase": self.phase, "phase_ms": round(self.phase_ms, 3),
                "peers_phase_ms": round(self.peers_phase_ms, 3), "ratio": round(self.ratio, 3),
                "first_step": self.first_step, "flagged_step": self.step}


class StragglerWatch:
    """Windows in, stragglers out (each rank reported once)."""

    def __init__(self, ratio: float = RATIO, windows: int = WINDOWS, min_excess_ms: float = MIN_EXCESS_MS):
        self.ratio, self.windows, self.min_excess_ms = ratio, windows, min_excess_ms
        self._pending: Dict[int, Dict[int, Dict[str, float]]] = {}  # step -> rank -> ms per phase
        self._ranks: set = set()
        self._recent: Dict[int, Deque[tuple]] = {}  # rank -> ((first step, last step), slow?) of its latest windows
        self._last_step = 0                      # the newest window judged
        self.flagged: Dict[int, Straggler] = {}

    def add(self, rank: int, step: int, phases_ms: Mapping[str, float]) -> List[Straggler]:
        """One rank's window ending at ``step``; returns the ranks that just became stragglers."""
        self._ranks.add(rank)
        if step <= self._last_step:
            return []  # a window already judged without it (a rank that reported late)
        self._pending.setdefault(step, {})[rank] = dict(phases_ms)
        found = []
        for s in sorted(self._pending)[:-KEPT_WINDOWS]:
            del self._pending[s]
        for s in sorted(self._pending):
            if len(self._pending[s]) == len(self._ranks) >= 2:
                found += self._judge(s, self._pending.pop(s))
                self._last_step = s
        return found

    def _judge(self, step: int, window: Dict[int, Dict[str, float]]) -> List[Straggler]:
        work = {rank: sum(ms.values()) for rank, ms in window.items()}
        found = []
        for rank, ms in window.items():
            peers = [r for r in window if r != rank]
            peer_work = statistics.median(work[r] for r in peers)
            slow = work[rank] > self.ratio * peer_work and work[rank] - peer_work > self.min_excess_ms
            recent = self._recent.setdefault(rank, collections.deque(maxlen=self.windows + 1))
            recent.append(((self._last_step + 1, step), slow))
            slow_windows = [span for span, was_slow in recent if was_slow]
            if not slow or len(slow_windows) < self.windows or rank in self.flagged:
                continue
            phases = set(ms).union(*(window[r] for r in peers))
            peer_ms = {p: statistics.median(window[r].get(p, 0.0) for r in peers) for p in phases}
            phase = max(sorted(phases), key=lambda p: ms.get(p, 0.0) - peer_ms[p])
            self.flagged[rank] = Straggler(rank, step, phase, ms.get(phase, 0.0), peer_ms[phase],
                                           work[rank] / peer_work if peer_work > 0 else float("inf"),
                                           slow_windows[0][0])
            found.append(self.flagged[rank])
        return found
