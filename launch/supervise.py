"""Run a :class:`~launch.plan.Plan`, watch the workers, report the first failure, restart.

One attempt is a small state machine: RUNNING until the launcher process (mpirun/horovodrun)
ends, a rank reports a failure (then the job gets ``failure_grace`` seconds to end by itself),
a rank's heartbeat count stops moving (HUNG), or the launcher is interrupted (INTERRUPTED). Leaving
RUNNING always stops every worker: SIGTERM (and SIGCONT, so a stopped process can act on it),
then SIGKILL after ``stop_grace`` seconds, because a rank stuck in a collective ignores SIGTERM.

Workers are found three ways, because Open MPI and Horovod's Gloo launcher put each worker in a
process group of its own: our process group, the launcher process's descendants (sampled while
it runs) and the ``started-<rank>.json`` files the shims write (pids on this host).

The root cause is the failed rank with the earliest ``end_time`` in the shims' status files,
or the earliest ``raised-<rank>.json`` that ``distrib.init()``'s exception hook writes (see
distrib/crash_record.py: the shim of the rank that raised may be killed by mpirun before it can
write its own file).
"""
from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, TextIO, Tuple

import psutil

from launch.cli import LaunchConfig
from launch.plan import HEARTBEAT_DIR_ENV, RESTART_COUNT_ENV, STATUS_DIR_ENV, Plan

POLL_S = 0.2
LAUNCHER_EXIT_S = 1.0  # for mpirun/horovodrun to end on its own after its local workers did


class State(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class RankStatus:
    """One ``rank-<rank>.json`` written by launch/worker.py."""
    rank: Optional[int]
    host: str
    pid: int
    exit_code: int
    signal: Optional[str]
    end_time: float
    stderr_tail: Tuple[str, ...] = ()
    exception: Optional[str] = None  # from raised-<rank>.json: "RuntimeError: ..."

    @classmethod
    def from_dict(cls, d: Mapping) -> "RankStatus":
        return cls(rank=d.get("rank"), host=d.get("host", "?"), pid=d.get("pid", 0),
                   exit_code=int(d["exit_code"]), signal=d.get("signal"), end_time=float(d["end_time"]),
                   stderr_tail=tuple(d.get("stderr_tail") or ()))

    @property
    def how(self) -> str:
        ended = f"killed by {self.signal}" if self.signal else f"exit code {self.exit_code}"
        return f"{ended} (uncaught {self.exception})" if self.exception else ended


@dataclass(frozen=True)
class Outcome:
    state: State
    exit_code: int
    message: str = ""              # the root cause, one line
    details: Tuple[str, ...] = ()  # the failed rank's last stderr lines
    rank: Optional[int] = None     # the failed or hung rank


# What a rank prints when it failed only because a peer did: Horovod shuts down on every rank
# once one rank raised, and the others' pending collectives then raise. Such a rank can end
# *before* the one that raised (still printing its traceback), so it is not the root cause.
PEER_FAILURE_MARKS = ("HorovodInternalError", "Horovod has been shut down", "Connection closed by peer")


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


def failure_outcome(status: RankStatus) -> Outcome:
    return Outcome(State.FAILED, status.exit_code if 0 < status.exit_code < 256 else 1,
                   f"rank {status.rank} on {status.host} failed first: {status.how}", status.stderr_tail,
                   status.rank)


@dataclass(frozen=True)
class Progress:
    """What the launcher knows of one rank's heartbeat (see distrib/heartbeat.py)."""
    count: int      # beats so far: comparable across ranks, which all beat at the same points
    since: float    # launcher's monotonic clock when this count was first seen
    written: float  # the file's mtime: stops moving when the whole process is frozen


@dataclass(frozen=True)
class Hang:
    rank: int
    seconds: float  # without progress
    count: int      # its beats
    furthest: int   # the most beats of any rank

    def describe(self, timeout: float) -> str:
        return (f"rank {self.rank} hung: no progress for {self.seconds:.0f} s at heartbeat {self.count}, "
                f"the furthest rank is at {self.furthest} (--hang-timeout {timeout:g})")


def updated_progress(progress: Mapping[int, Progress], beats: Mapping[int, Tuple[int, float]],
                     now: float) -> Dict[int, Progress]:
    """``progress`` after reading ``beats`` (rank -> (count, mtime)) at ``now``."""
    updated = dict(progress)
    for rank, (count, written) in beats.items():
        old = progress.get(rank)
        since = old.since if old is not None and old.count == count else now
        updated[rank] = Progress(count, since, written)
    return updated


def hung_rank(progress: Mapping[int, Progress], finished: Iterable[int], timeout: float,
              now: float) -> Optional[Hang]:
    """Once an unfinished rank has made no progress for ``timeout`` seconds, the rank to blame.

    A stalled rank stalls its peers: they block in the next allreduce, having beaten once more
    than it did. So of the stalled ranks the one with the fewest beats is the cause; among equals,
    the one whose heartbeat file stopped being written first (a frozen process), then the lowest
    rank. Ranks that never beat are not judged (start-up, compilation, a script that never beats).
    """
    done = set(finished)
    stalled = [(p.count, p.written, rank, p) for rank, p in progress.items()
               if rank not in done and now - p.since > timeout]
    if not stalled:
        return None
    count, _, rank, p = min(stalled)
    return Hang(rank, now - p.since, count, max(q.count for q in progress.values()))


def _read_records(folder: str, prefix: str) -> List[dict]:
    records = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue  # written atomically by the shim or distrib; anything else is not ours
            if isinstance(record, dict):
                records.append(record)
    return records


def with_raised(status: Optional[RankStatus], raised: Mapping) -> RankStatus:
    """Fold a ``raised-<rank>.json`` into the rank's status. The raise is when the rank's failure
    began (its end came after Horovod's shutdown and finalisation); a rank whose shim was killed
    before it wrote a status would have exited with Python's code for an uncaught exception, 1."""
    if status is None:
        return RankStatus(rank=raised.get("rank"), host=raised.get("host", "?"), pid=raised.get("pid", 0),
                          exit_code=1, signal=None, end_time=float(raised["time"]),
                          stderr_tail=tuple(raised.get("traceback_tail") or ()), exception=raised.get("exception"))
    return replace(status, end_time=min(status.end_time, float(raised["time"])), exception=raised.get("exception"))


def read_statuses(folder: str) -> List[RankStatus]:
    """Every rank that ended or raised: the shims' ``rank-*.json`` with distrib's ``raised-*.json``."""
    by_rank: Dict[int, RankStatus] = {}
    unknown: List[RankStatus] = []  # a shim that found no rank variable
    for record in _read_records(folder, "rank-"):
        try:
            status = RankStatus.from_dict(record)
        except (KeyError, TypeError, ValueError):
            continue
        if status.rank is None:
            unknown.append(status)
        else:
            by_rank[status.rank] = status
    for raised in _read_records(folder, "raised-"):
        rank = raised.get("rank")
        try:
            by_rank[rank] = with_raised(by_rank.get(rank), raised)
        except (KeyError, TypeError, ValueError):
            continue
    return [by_rank[rank] for rank in sorted(by_rank)] + unknown


def read_heartbeats(folder: str) -> Dict[int, Tuple[int, float]]:
    """rank -> (beat count, file mtime) from the ``heartbeat-<rank>`` files distrib writes."""
    beats = {}
    for name in os.listdir(folder):
        rank = name[len("heartbeat-"):]
        if name.startswith("heartbeat-") and rank.isdigit():
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    beats[int(rank)] = (int(f.read()), os.stat(path).st_mtime)
            except (OSError, ValueError):
                continue  # replaced atomically; anything else is not ours
    return beats


class Attempt:
    """One run of the plan, from start to a final :class:`Outcome`, with every worker stopped."""

    def __init__(self, plan: Plan, config: LaunchConfig, number: int, log, interrupted):
        self.plan, self.config, self.number = plan, config, number
        self.log, self.interrupted = log, interrupted
        self.tracked: Dict[int, psutil.Process] = {}
        self.seen_started: set = set()
        self.reported: set = set()
        self.progress: Dict[int, Progress] = {}  # heartbeats, with --hang-timeout
        self.host = socket.gethostname()

    def run(self) -> Outcome:
        self.status_dir = tempfile.mkdtemp(prefix="distrib-launch-")
        try:
            env = {**os.environ, **self.plan.env, STATUS_DIR_ENV: self.status_dir,
                   RESTART_COUNT_ENV: str(self.number)}
            if self.config.hang_timeout:
                env[HEARTBEAT_DIR_ENV] = self.status_dir
            try:
                self.proc = subprocess.Popen(self.plan.argv, env=env, start_new_session=True)
            except OSError as exc:
                return Outcome(State.FAILED, 1, f"cannot start {self.plan.argv[0]}: {exc.strerror}; install it "
                                                f"or put it on PATH")
            try:
                self.root = psutil.Process(self.proc.pid)
            except psutil.NoSuchProcess:
                self.root = None
            try:
                outcome = self._watch()
            finally:
                self._stop()
            if outcome.state is State.HUNG:  # its stderr up to the moment it was stopped
                tail = next((s.stderr_tail for s in read_statuses(self.status_dir) if s.rank == outcome.rank), ())
                outcome = replace(outcome, details=tail)
            return outcome
        finally:
            shutil.rmtree(self.status_dir, ignore_errors=True)

    def _watch(self) -> Outcome:
        failed_at = None
        while True:
            self._track()
            statuses = read_statuses(self.status_dir)
            self._say_ended(statuses)
            signum = self.interrupted()
            if signum:
                name = signal.Signals(signum).name
                return Outcome(State.INTERRUPTED, 128 + signum, f"interrupted by {name}: stopped every worker")
            # Under Horovod Elastic a dead worker is Horovod's to handle (the others re-form
            # the ring); only horovodrun's own exit ends the job.
            if failed_at is None and not self.config.elastic and any(s.exit_code != 0 for s in statuses):
                failed_at = time.monotonic()
            if self.config.hang_timeout and failed_at is None:
                now = time.monotonic()
                self.progress = updated_progress(self.progress, read_heartbeats(self.status_dir), now)
                hang = hung_rank(self.progress, [s.rank for s in statuses], self.config.hang_timeout, now)
                if hang:
                    return Outcome(State.HUNG, 1, hang.describe(self.config.hang_timeout), rank=hang.rank)
            if self.proc.poll() is not None:
                break
            if failed_at is not None and time.monotonic() - failed_at > self.config.failure_grace:
                self.log("a rank failed and the job did not end by itself: stopping every worker", verbose=True)
                break
            time.sleep(POLL_S)
        self._stop()  # leftovers, e.g. ranks that outlived their launcher
        statuses = read_statuses(self.status_dir)
        self._say_ended(statuses)
        code = self.proc.returncode
        if self.config.elastic and code == 0:
            return Outcome(State.SUCCEEDED, 0)  # some workers died, the job recovered
        failure = first_failure(statuses)
        if failure is not None:
            return failure_outcome(failure)
        if code != 0:
            return Outcome(State.FAILED, code if 0 < code < 256 else 1,
                           f"{os.path.basename(self.plan.argv[0])} exited with code {code} before any rank "
                           f"reported a failure (see its messages above)")
        return Outcome(State.SUCCEEDED, 0)

    def _say_ended(self, statuses: List[RankStatus]) -> None:
        for s in statuses:
            if s.rank not in self.reported:
                self.reported.add(s.rank)
                self.log(f"rank {s.rank} on {s.host} ended: {s.how}", verbose=True)

    def _track(self) -> None:
        """Remember every process that may be a worker, while it can still be found."""
        procs = []
        if self.root is not None:
            try:
                procs += self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for name in os.listdir(self.status_dir):
            if name.startswith("started-") and name.endswith(".json") and name not in self.seen_started:
                try:
                    with open(os.path.join(self.status_dir, name), encoding="utf-8") as f:
                        started = json.load(f)
                except (OSError, ValueError):
                    continue
                self.seen_started.add(name)
                if started.get("host") == self.host:
                    for key in ("shim_pid", "pid"):
                        try:
                            procs.append(psutil.Process(int(started[key])))
                        except (psutil.Error, KeyError, ValueError):
                            pass
        for p in procs:
            self.tracked.setdefault(p.pid, p)

    def _signal_launcher(self, sig: int) -> None:
        """mpirun/horovodrun and whatever shares its process group; remote workers are reached through it."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _signal_workers(self, sig: int) -> List[psutil.Process]:
        """Every tracked local worker process (shims and scripts): those still alive."""
        alive = []
        for p in self.tracked.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.send_signal(sig)
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def _stop(self) -> None:
        """SIGTERM the local workers first and give them ``stop_grace`` seconds (a script may save a
        checkpoint on SIGTERM), then the launcher, then SIGKILL what is left. The launcher comes
        second because mpirun answers SIGTERM by killing its workers at once (see plan.OMPI_MCA)."""
        self._track()
        deadline = time.monotonic() + self.config.stop_grace
        alive = self._signal_workers(signal.SIGTERM)
        if not alive and self.proc.poll() is not None:
            return
        self.log(f"stopping {len(alive)} worker processes (SIGTERM)", verbose=True)
        self._signal_workers(signal.SIGCONT)  # a stopped (SIGSTOP) process only acts on SIGTERM once continued
        _, alive = psutil.wait_procs(alive, timeout=self.config.stop_grace)
        try:  # mpirun ends by itself once its workers have; a SIGTERM while it aborts can crash it
            self.proc.wait(timeout=LAUNCHER_EXIT_S)
        except subprocess.TimeoutExpired:
            pass
        self._signal_launcher(signal.SIGTERM)
        self._signal_launcher(signal.SIGCONT)
        try:
            self.proc.wait(timeout=max(0.5, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self._track()
        alive = self._signal_workers(0)
        if alive or self.proc.poll() is None:
            self.log("workers still running after SIGTERM: sending SIGKILL", verbose=True)
            self._signal_launcher(signal.SIGKILL)
            alive = self._signal_workers(signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
        self.proc.wait()


class _SignalCatcher:
    """SIGINT/SIGTERM to the launcher: remember the first one; the attempt loop stops the workers."""

    def __enter__(self):
        self.caught: Optional[int] = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        if self.caught is None:
            self.caught = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def supervise(plan: Plan, config: LaunchConfig, out: TextIO = sys.stderr) -> int:
    """Run the plan (again after a failure, up to ``config.max_restarts`` times); return the exit status."""
    def log(message: str, verbose: bool = False) -> None:
        if config.verbose or not verbose:
            out.write(f"distrib-launch: {message}\n")
            out.flush()

    with _SignalCatcher() as signals:
        for number in range(config.max_restarts + 1):
            if signals.caught:  # between attempts: do not start another one
                return 128 + signals.caught
            outcome = Attempt(plan, config, number, log, lambda: signals.caught).run()
            if outcome.state is State.SUCCEEDED:
                log("all ranks finished successfully", verbose=True)
                return 0
            log(outcome.message)
            if outcome.state is State.INTERRUPTED:
                return outcome.exit_code
            if outcome.details:
                log(f"last {len(outcome.details)} lines of its stderr:")
                out.write("".join(f"    {line}\n" for line in outcome.details))
            if number < config.max_restarts:
                log(f"restart {number + 1}/{config.max_restarts}")
        if config.max_restarts:
            log(f"giving up after {config.max_restarts} restarts; root cause: {outcome.message}")
        return outcome.exit_code
