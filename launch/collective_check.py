"""Do the ranks enter the same collectives? (pure; the records come from distrib/heartbeat.py)

Every rank numbers the collectives it enters (its beat count) and reports, for each, the name
distrib gave it, its shape and dtype. The k-th collective must be the same on every rank: when it
is not, the job would hang until a timeout (a rank skipped one, or called two in another order:
Horovod waits for a tensor that never comes) or fail with an error that names no rank (another
shape). :func:`first_mismatch` finds the first call number where the ranks' records differ and
says who entered what.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

Call = Tuple[str, Optional[tuple], Optional[str]]  # name, shape, dtype


def describe_call(call: Call) -> str:
    name, shape, dtype = call
    if shape is None and dtype is None:
        return f"'{name}'"
    return f"'{name}' {dtype or '?'}[{', '.join(str(d) for d in shape or ())}]"


def _ranks(ranks: List[int], hosts: Mapping[int, str]) -> str:
    named = [f"{r} on {hosts[r]}" if hosts.get(r) else str(r) for r in ranks]
    return f"rank {named[0]}" if len(ranks) == 1 else f"ranks {', '.join(named)}"


@dataclass(frozen=True)
class Mismatch:
    number: int                          # the call number (beat count) where the ranks differ
    entered: Tuple[Tuple[Call, Tuple[int, ...]], ...]  # each distinct call, with the ranks that entered it
    hints: Tuple[str, ...] = ()          # "rank 1 skipped ...", when the neighbouring calls say so

    @property
    def ranks(self) -> Tuple[int, ...]:
        return tuple(sorted(r for _, ranks in self.entered for r in ranks))

    def describe(self, hosts: Optional[Mapping[int, str]] = None) -> str:
        parts = "; ".join(f"{_ranks(list(ranks), hosts or {})} entered {describe_call(call)}" for call, ranks in self.entered)
        hints = f" ({'; '.join(self.hints)})" if self.hints else ""
        return f"collective mismatch at collective #{self.number}: {parts}{hints}"


def first_mismatch(calls: Mapping[int, Mapping[int, Call]]) -> Optional[Mismatch]:
    """The first call number that two ranks both recorded with different collectives, or None.

    ``calls``: rank -> call number -> (name, shape, dtype). Call numbers only one rank has
    recorded (the others have not got there yet, or forgot them) are not judged."""
    numbers = sorted({n for per_rank in calls.values() for n in per_rank})
    for n in numbers:
        groups: Dict[Call, List[int]] = {}
        for rank in sorted(calls):
            if n in calls[rank]:
                groups.setdefault(calls[rank][n], []).append(rank)
        if len(groups) > 1:
            entered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0]))
            return Mismatch(n, tuple((call, tuple(ranks)) for call, ranks in entered), _hints(calls, n, entered))
    return None


def _hints(calls: Mapping[int, Mapping[int, Call]], n: int, entered) -> Tuple[str, ...]:
    """What the neighbouring calls say: the most common call at ``n`` is taken as the expected one."""
    expected, majority = entered[0]
    after = next((calls[r][n + 1] for r in majority if n + 1 in calls[r]), None)
    hints = []
    for call, ranks in entered[1:]:
        for rank in ranks:
            own_next = calls[rank].get(n + 1)
            if call[0] == expected[0]:
                continue  # the same collective with another shape or dtype: the message says it all
            if own_next == expected:
                hints.append(f"rank {rank} called them in another order")
            elif after is not None and call == after:
                hints.append(f"rank {rank} skipped {describe_call(expected)}")
    return tuple(hints)
