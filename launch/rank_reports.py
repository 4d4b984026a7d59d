"""What the launcher concludes from the workers' reports (pure functions).

The reports arrive over the status channel into the launcher's table (launch/status_server.py):
each worker's shim reports ``started`` and ``ended`` (how it ended), ``distrib.init()``'s
exception hook ``raised``, distrib's heartbeat its beat count (see distrib/watch/heartbeat.py). From
these: :func:`statuses_from` (how each rank ended), :func:`first_failure` (the root cause, not the
peers that died of it) and :func:`hung_rank`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

@dataclass(frozen=True)
class RankStatus:
    """How one rank ended: a shim's ``ended`` report (launch/worker.py), with its ``raised`` report."""
    rank: Optional[int]
    host: str
    pid: int
    exit_code: int
    signal: Optional[str]
    end_time: float
    stderr_tail: Tuple[str, ...] = ()
    exception: Optional[str] = None  # from its raised report: "RuntimeError: ..."

    @classmethod
    def from_dict(cls, d: Mapping) -> "RankStatus":
        return cls(rank=d.get("rank"), host=d.get("host", "?"), pid=d.get("pid", 0),
                   exit_code=int(d["exit_code"]), signal=d.get("signal"), end_time=float(d["end_time"]),
                   stderr_tail=tuple(d.get("stderr_tail") or ()))

    @property
    def how(self) -> str:
        ended = f"killed by {self.signal}" if self.signal else f"exit code {self.exit_code}"
        return f"{ended} (uncaught {self.exception})" if self.exception else ended


# What a rank prints when it failed only because a peer did: Horovod shuts down on every rank
# once one rank raised, and the others' pending collectives then raise. Such a rank can end
# *before* the one that raised (still printing its traceback), so it is not the root cause.
# torch.distributed's Gloo says "Connection reset by peer" when a peer process died mid-collective.
PEER_FAILURE_MARKS = ("HorovodInternalError", "Horovod has been shut down", "Connection closed by peer",
                      "Connection reset by peer")


def failed_because_of_a_peer(status: RankStatus) -> bool:
    lines = (*status.stderr_tail, status.exception or "")
    return any(mark in line for line in lines for mark in PEER_FAILURE_MARKS)


def first_failure(statuses: Iterable[RankStatus]) -> Optional[RankStatus]:
    """The root cause: the failed rank that ended first, among those that did not fail only
    because a peer did (all of them when every failed rank shows a peer's failure)."""
    failed = [s for s in statuses if s.exit_code != 0]
    if not failed:
        return None
    own = [s for s in failed if not failed_because_of_a_peer(s)] or failed
    return min(own, key=lambda s: (s.end_time, s.rank if s.rank is not None else -1))


@dataclass(frozen=True)
class Progress:
    """What the launcher knows of one rank's heartbeat (see distrib/watch/heartbeat.py)."""
    count: int      # beats so far: comparable across ranks, which all beat at the same points
    since: float    # launcher's monotonic clock when this count was first seen
    heard: float    # when its last beat arrived: stops moving when the whole process is frozen


@dataclass(frozen=True)
class Hang:
    rank: int
    seconds: float  # without progress
    count: int      # its beats
    furthest: int   # the most beats of any rank

    def describe(self, timeout: float, host: Optional[str] = None) -> str:
        where = f" on {host}" if host else ""
        return (f"rank {self.rank}{where} hung: no progress for {self.seconds:.0f} s at heartbeat {self.count}, "
                f"the furthest rank is at {self.furthest} (--hang-timeout {timeout:g})")


def updated_progress(progress: Mapping[int, Progress], beats: Mapping[int, Tuple[int, float]],
                     now: float) -> Dict[int, Progress]:
    """``progress`` after reading ``beats`` (rank -> (count, when it arrived)) at ``now``."""
    updated = dict(progress)
    for rank, (count, heard) in beats.items():
        old = progress.get(rank)
        since = old.since if old is not None and old.count == count else now
        updated[rank] = Progress(count, since, heard)
    return updated


def hung_rank(progress: Mapping[int, Progress], finished: Iterable[int], timeout: float,
              now: float, slack: float = 0.0) -> Optional[Hang]:
    """Once an unfinished rank has made no progress for ``timeout`` seconds, the rank to blame.

    A stalled rank stalls its peers: they block in the next collective, having beaten once more
    than it did. So of the stalled ranks the one with the fewest beats is the cause; among equals,
    the one whose beats stopped arriving first (a frozen process, a lost host), then the lowest
    rank. Ranks that never beat are not judged (start-up, compilation, a script that never beats).

    The launcher learns of a new count only when the rank next sends (once a second), so the
    peer that waits may seem to have stood still up to a send interval longer than the rank it
    waits for: once one rank passed ``timeout``, every rank that stood still for ``timeout -
    slack`` is a suspect too.
    """
    done = set(finished)
    idle = {rank: now - p.since for rank, p in progress.items() if rank not in done}
    if not any(seconds > timeout for seconds in idle.values()):
        return None
    stalled = [(progress[rank].count, progress[rank].heard, rank, progress[rank])
               for rank, seconds in idle.items() if seconds > timeout - slack]
    count, _, rank, p = min(stalled)
    return Hang(rank, now - p.since, count, max(q.count for q in progress.values()))


def with_raised(status: Optional[RankStatus], raised: Mapping) -> RankStatus:
    """Fold a rank's ``raised`` report into its status. The raise is when the rank's failure
    began (its end came after Horovod's shutdown and finalisation), and how it ended is Python's
    code for an uncaught exception, 1: a rank whose shim was killed before it reported, or whose
    script was stopped while still finalising (SIGTERM when a slow remote rank outlived the job),
    would have ended so."""
    if status is None:
        return RankStatus(rank=raised.get("rank"), host=raised.get("host", "?"), pid=raised.get("pid", 0),
                          exit_code=1, signal=None, end_time=float(raised["time"]),
                          stderr_tail=tuple(raised.get("traceback_tail") or ()), exception=raised.get("exception"))
    return replace(status, end_time=min(status.end_time, float(raised["time"])), exception=raised.get("exception"),
                   exit_code=1, signal=None)


def statuses_from(ended: Iterable[Mapping], raised: Iterable[Mapping]) -> List[RankStatus]:
    """Every rank that ended or raised: the shims' ``ended`` reports with distrib's ``raised``
    ones, by rank (reports without a usable rank or time are skipped), then the shims without one."""
    by_rank: Dict[int, RankStatus] = {}
    unknown: List[RankStatus] = []  # a shim that found no rank variable
    for record in ended:
        try:
            status = RankStatus.from_dict(record)
        except (KeyError, TypeError, ValueError):
            continue
        if status.rank is None:
            unknown.append(status)
        else:
            by_rank[status.rank] = status
    for record in raised:
        rank = record.get("rank")
        try:
            by_rank[rank] = with_raised(by_rank.get(rank), record)
        except (KeyError, TypeError, ValueError):
            continue
    return [by_rank[rank] for rank in sorted(by_rank)] + unknown
