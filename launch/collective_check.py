"""Do the ranks enter the same collectives? (pure; the records come from distrib/watch/heartbeat.py)

Every rank numbers the collectives it enters (its beat count) and reports, for each, the name
distrib gave it, how many times it entered that name so far, its shape and dtype. Two checks:

* **Shape and dtype**: the k-th call of a name must have the same shape and dtype on every rank,
  whatever the order the ranks started their calls in (asynchronous calls, such as gradient
  buckets, may start in another order on each rank, and the engine pairs them by name). Another
  shape ends in the engine's error that names no rank; this names them at once.
* **Which collective**: a rank that skipped a collective, or called two in another order, leaves
  every rank blocked in a different one. Only once the whole job stands still (``stalled_at``)
  are the collectives at the lowest count compared, and one counts as a mismatch only when some
  rank never entered it at all: a different call at the same number that the other rank did
  enter (at another number) is a legitimate reordering of asynchronous calls.
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


def _mismatch_at(calls: Mapping[int, Mapping[int, Call]], n: int, picked: Mapping[int, Call]) -> Optional[Mismatch]:
    groups: Dict[Call, List[int]] = {}
    for rank in sorted(picked):
        groups.setdefault(picked[rank], []).append(rank)
    if len(groups) < 2:
        return None
    entered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0]))
    return Mismatch(n, tuple((call, tuple(ranks)) for call, ranks in entered), _hints(calls, n, entered))


def first_mismatch(calls: Mapping[int, Mapping[int, Call]], occurrences: Mapping[int, Mapping[int, int]],
                   stalled_at: Optional[int] = None) -> Optional[Mismatch]:
    """A mismatch the ranks' records show, or None.

    ``calls``: rank -> call number -> (name, shape, dtype); ``occurrences``: rank -> call number
    -> how many times that rank had entered that name by then. ``stalled_at``: the lowest count
    of a job that stands still (None while it moves). Calls that only one rank has recorded (the
    others have not got there yet, or forgot them) are not judged."""
    by_key: Dict[Tuple[str, int], Dict[int, Tuple[int, Call]]] = {}
    for rank in sorted(calls):
        for n, call in calls[rank].items():
            occurrence = occurrences.get(rank, {}).get(n)
            if occurrence is not None:
                by_key.setdefault((call[0], occurrence), {})[rank] = (n, call)
    for key in sorted(by_key, key=lambda k: min(n for n, _ in by_key[k].values())):
        found = by_key[key]
        if len({call for _, call in found.values()}) > 1:
            n = min(number for number, _ in found.values())
            return _mismatch_at(calls, n, {rank: call for rank, (_, call) in found.items()})
    if stalled_at is not None:
        picked = {r: c[stalled_at] for r, c in calls.items() if stalled_at in c}
        entered = {r: {(call[0], occurrences.get(r, {}).get(n)) for n, call in c.items()} for r, c in calls.items()}
        # A call another rank entered too (at another number) is a reordering of asynchronous
        # calls that the engine pairs by name; one that some rank never entered blocks the job.
        if any((picked[r][0], occurrences.get(r, {}).get(stalled_at)) not in entered[other]
               for r in picked for other in calls if other != r):
            return _mismatch_at(calls, stalled_at, picked)
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
