"""Run a :class:`~launch.plan.Plan`, watch the workers, report the first failure, restart.

One attempt is a small state machine: RUNNING until the launcher process (mpirun/horovodrun)
ends, a rank reports a failure (then the job gets ``failure_grace`` seconds to end by itself),
a rank's heartbeat count stops moving (HUNG), or the launcher is interrupted (INTERRUPTED). Leaving
RUNNING always stops every worker: SIGTERM (and SIGCONT, so a stopped process can act on it),
then SIGKILL after ``stop_grace`` seconds, because a rank stuck in a collective ignores SIGTERM.

The workers report over the status channel: each attempt runs a :class:`StatusServer` (a TCP
port with a new secret, see launch/status_server.py) whose threads keep what they report in a
table in memory, whatever host the workers run on; the watch loop reads a copy of it.

Workers on this host are found three ways, because Open MPI and Horovod's Gloo launcher put each
worker in a process group of its own: our process group, the launcher process's descendants
(sampled while it runs) and the shims' ``started`` reports (pids on this host). Workers on other
hosts are stopped by their shims when the status server ends their connections, and by
mpirun/horovodrun.

The root cause is the failed rank whose ``ended`` report came first, or whose ``raised`` report
(``distrib.init()``'s exception hook, see distrib/watch/crash_record.py: the shim of the rank that
raised may be killed by mpirun before it can report) came first.
"""
from __future__ import annotations

import enum
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, TextIO, Tuple

import psutil

from launch.cli import LaunchConfig
from launch.collective_check import first_mismatch
from launch.hang_report import hang_lines
from launch.plan import Plan
from launch.rank_reports import (Progress, RankStatus, first_failure, hung_rank, statuses_from, updated_progress)
from launch.status_channel import HEARTBEAT_ENV, RESTART_COUNT_ENV, STOP_GRACE_ENV
from launch.status_server import Reports, StatusServer
from launch.stragglers import StragglerWatch

POLL_S = 0.2
BEAT_SLACK_S = 2.0   # how much later than a peer's a rank's standstill may be seen (a beat a second, see hung_rank)
MISMATCH_STALL_S = 1.5  # the whole job stood still this long: compare the collectives the ranks are in
STACKS_WAIT_S = 2.0  # for a hung rank's heartbeat thread to answer with its stacks
STATE_WAIT_S = 1.5   # then for its shim to say what the kernel says of the process
LAUNCHER_EXIT_S = 1.0  # for mpirun/horovodrun to end on its own after its local workers did


class State(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Outcome:
    state: State
    exit_code: int
    message: str = ""              # the root cause, one line
    details: Tuple[str, ...] = ()  # the failed rank's last stderr lines
    rank: Optional[int] = None     # the failed or hung rank
    report: Tuple[str, ...] = ()   # what follows the message: where a hung rank is, its stacks


def failure_outcome(status: RankStatus) -> Outcome:
    return Outcome(State.FAILED, status.exit_code if 0 < status.exit_code < 256 else 1,
                   f"rank {status.rank} on {status.host} failed first: {status.how}", status.stderr_tail,
                   status.rank)


class Attempt:
    """One run of the plan, from start to a final :class:`Outcome`, with every worker stopped."""

    def __init__(self, plan: Plan, config: LaunchConfig, number: int, log, interrupted,
                 to_forward=lambda: (), say=lambda outcome: None):
        self.plan, self.config, self.number = plan, config, number
        self.log, self.interrupted = log, interrupted
        self.say = say  # prints a failed outcome's verdict and report: as soon as it is known
        self.to_forward = to_forward  # signals the launcher received for the workers (SIGUSR2)
        self.tracked: Dict[int, psutil.Process] = {}
        self.shims: Dict[int, psutil.Process] = {}  # this host's worker shims: they forward signals
        self.seen_started: set = set()      # keys of the started reports already tracked
        self.reported: set = set()
        self.progress: Dict[int, Progress] = {}  # heartbeats, with --hang-timeout
        self.rank_hosts: Dict[int, str] = {}     # from the shims' started reports, any host
        self.stragglers = StragglerWatch()
        self.host = socket.gethostname()

    def run(self) -> Outcome:
        self.server = StatusServer()
        try:
            # The heartbeat is on unless DISTRIB_HEARTBEAT=0 is set: besides hangs it carries the
            # collective records (the mismatch check) and the phase times (stragglers); it costs a
            # rank one send a second (benchmarks/bench_diagnosis.py measures it).
            env = {**os.environ, **self.plan.env, **self.server.env(), RESTART_COUNT_ENV: str(self.number),
                   STOP_GRACE_ENV: f"{self.config.stop_grace:g}",
                   HEARTBEAT_ENV: "0" if os.environ.get(HEARTBEAT_ENV) == "0" else "1"}
            try:
                self.proc = subprocess.Popen(self.plan.argv, env=env, start_new_session=True)
            except OSError as exc:
                outcome = Outcome(State.FAILED, 1, f"cannot start {self.plan.argv[0]}: {exc.strerror}; install it "
                                                   f"or put it on PATH")
                self.say(outcome)
                return outcome
            try:
                self.root = psutil.Process(self.proc.pid)
            except psutil.NoSuchProcess:
                self.root = None
            try:
                outcome = self._watch()
                if outcome.state is not State.SUCCEEDED:
                    self.say(outcome)  # before the workers are stopped, which takes up to stop_grace
            finally:
                self._stop()
            if outcome.state is State.HUNG:  # its stderr up to the moment it was stopped
                tail = next((s.stderr_tail for s in self._statuses(self.server.table.read()) if s.rank == outcome.rank), ())
                outcome = replace(outcome, details=tail)
            return outcome
        finally:
            self.server.close()
            if self.server.refused:
                self.log(f"refused {self.server.refused} status reports without a valid signature", verbose=True)

    @staticmethod
    def _statuses(reports: Reports) -> List[RankStatus]:
        return statuses_from(reports.ended.values(), reports.raised.values())

    def _watch(self) -> Outcome:
        failed_at = None
        while True:
            reports = self.server.table.read()
            self._track(reports)
            statuses = self._statuses(reports)
            self._say_ended(statuses)
            signum = self.interrupted()
            if signum:
                name = signal.Signals(signum).name
                return Outcome(State.INTERRUPTED, 128 + signum, f"interrupted by {name}: stopped every worker")
            for sig in self.to_forward():
                self._forward(sig)
            # Under Horovod Elastic a dead worker is Horovod's to handle (the others re-form
            # the ring); only horovodrun's own exit ends the job.
            if failed_at is None and not self.config.elastic and any(s.exit_code != 0 for s in statuses):
                failed_at = time.monotonic()
            self._watch_stragglers()
            now = time.monotonic()
            beats = {rank: (b.count, b.heard) for rank, b in reports.beats.items()}
            self.progress = updated_progress(self.progress, beats, now)
            mismatch = self._mismatch(reports, self._stalled_at([s.rank for s in statuses], now))
            if mismatch is not None:
                return mismatch
            if self.config.hang_timeout and failed_at is None:
                hang = hung_rank(self.progress, [s.rank for s in statuses], self.config.hang_timeout, now,
                                 slack=BEAT_SLACK_S)
                if hang:
                    return Outcome(State.HUNG, 1, hang.describe(self.config.hang_timeout, self.rank_hosts.get(hang.rank)),
                                   rank=hang.rank, report=tuple(self._hang_report(hang)))
            if self.proc.poll() is not None:
                break
            if failed_at is not None and time.monotonic() - failed_at > self.config.failure_grace:
                self.log("a rank failed and the job did not end by itself: stopping every worker", verbose=True)
                break
            time.sleep(POLL_S)
        self._stop()  # leftovers, e.g. ranks that outlived their launcher
        reports = self.server.table.read()
        statuses = self._statuses(reports)
        self._say_ended(statuses)
        self._watch_stragglers()  # the windows of the last steps
        mismatch = self._mismatch(reports)  # the engine's own error about another shape ended the job first
        if mismatch is not None:
            return mismatch
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

    def _stalled_at(self, finished: List[int], now: float) -> Optional[int]:
        """The lowest beat count when every unfinished rank (two or more) has stood still for
        MISMATCH_STALL_S: then the collectives they are in are compared."""
        done = set(finished)
        running = [p for rank, p in self.progress.items() if rank not in done]
        if len(running) < 2 or any(now - p.since < MISMATCH_STALL_S for p in running):
            return None
        return min(p.count for p in running)

    def _mismatch(self, reports: Reports, stalled_at: Optional[int] = None) -> Optional[Outcome]:
        """The ranks entered different collectives: the job cannot go on, say who entered what.
        Not under Horovod Elastic, whose new workers count their collectives from zero."""
        if self.config.elastic:
            return None
        found = first_mismatch(reports.calls, reports.occurrences, stalled_at)
        if found is None:
            return None
        return Outcome(State.FAILED, 1, found.describe(self.rank_hosts), rank=found.ranks[-1])

    def _watch_stragglers(self) -> None:
        """Judge the phase-time windows that arrived; log a straggler and tell rank 0 (metrics.jsonl)."""
        for rank, step, phases in self.server.table.take_windows():
            for found in self.stragglers.add(rank, step, phases):
                host = self.rank_hosts.get(found.rank)
                self.log(found.describe(host))
                self.server.request(0, "notice", event="straggler", **found.as_event(host))

    def _hang_report(self, hang) -> List[str]:
        """Ask the hung rank for its stacks; without an answer, ask its shim what the process is doing."""
        table = self.server.table
        table.forget_answer("stacks", hang.rank)
        table.forget_answer("state", hang.rank)
        stacks = self._ask(hang.rank, "want_stacks", "stacks", STACKS_WAIT_S)
        state = None if stacks is not None else self._ask(hang.rank, "want_state", "state", STATE_WAIT_S)
        return hang_lines(hang, table.read(), self.rank_hosts, stacks, state, STACKS_WAIT_S, time.monotonic())

    def _ask(self, rank: int, request: str, answer: str, wait_s: float) -> Optional[dict]:
        deadline = time.monotonic() + wait_s
        if not self.server.request(rank, request):
            return None
        while time.monotonic() < deadline:
            found = self.server.table.answer(answer, rank)
            if found is not None:
                return found
            time.sleep(0.02)
        return None

    def _say_ended(self, statuses: List[RankStatus]) -> None:
        for s in statuses:
            if s.rank not in self.reported:
                self.reported.add(s.rank)
                self.log(f"rank {s.rank} on {s.host} ended: {s.how}", verbose=True)

    def _track(self, reports: Optional[Reports] = None) -> None:
        """Remember every process that may be a worker, while it can still be found."""
        procs = []
        if self.root is not None:
            try:
                procs += self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        reports = reports or self.server.table.read()
        for key, started in reports.started.items():
            if key not in self.seen_started:
                self.seen_started.add(key)
                self.rank_hosts[started.get("rank")] = started.get("host")
                if started.get("host") == self.host:
                    for key in ("shim_pid", "pid"):
                        try:
                            procs.append(psutil.Process(int(started[key])))
                        except (psutil.Error, KeyError, ValueError):
                            pass
                        else:
                            if key == "shim_pid":
                                self.shims[procs[-1].pid] = procs[-1]
        for p in procs:
            self.tracked.setdefault(p.pid, p)

    def _forward(self, sig: int) -> None:
        """Pass a signal meant for the job (Slurm's SIGUSR2 before the time limit) to the workers
        and keep watching: each shim hands it to its script, whose PreemptionHandler checkpoints
        and the ranks agree at the next step. The shims of this host get it from us; those of
        other hosts (ssh, srun: neither carries a signal to the remote process) as a ``signal``
        request over the status channel, whatever the engine. With no shim known yet, mpirun
        forwards SIGUSR1/SIGUSR2 to every rank itself."""
        name = signal.Signals(sig).name
        self._track()
        here = 0
        for p in self.shims.values():
            try:
                p.send_signal(sig)
                here += 1
            except psutil.Error:
                pass
        elsewhere = sum(self.server.request(rank, "signal", signal=name) for rank in self._remote_ranks())
        if here or elsewhere:
            where = [f"{here} workers on this host"] if here else []
            where += [f"{elsewhere} on other hosts (status channel)"] if elsewhere else []
            self.log(f"{name}: forwarded to {' and '.join(where)}")
        elif os.path.basename(self.plan.argv[0]) == "mpirun":
            self._signal_launcher(sig)
            self.log(f"{name}: forwarded to mpirun (no worker on this host yet)")
        else:
            self.log(f"{name}: no worker started yet to forward it to; ignored")

    def _remote_ranks(self) -> List[int]:
        """The ranks whose shim runs on another host and has not ended."""
        reports = self.server.table.read()
        return sorted(key for key, started in reports.started.items()
                      if isinstance(key, int) and started.get("host") != self.host and key not in reports.ended)

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
        self.server.stop_workers()  # every shim, on any host, stops its script (SIGTERM, then SIGKILL)
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
    """SIGINT/SIGTERM to the launcher: remember the first one; the attempt loop stops the workers.
    SIGUSR2 (``scancel --signal=USR2 --batch``, ``#SBATCH --signal=B:USR2@90``: Slurm's warning
    before the time limit, sent to the batch script's processes): queued for the attempt to
    forward to the workers, which checkpoint and requeue; the launcher keeps running (its default
    action would kill it, exit 140, and leave the workers unsupervised)."""

    FORWARDED = (signal.SIGUSR2,)

    def __enter__(self):
        self.caught: Optional[int] = None
        self.pending: List[int] = []
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM, *self.FORWARDED)}
        return self

    def _handle(self, signum, _frame):
        if signum in self.FORWARDED:
            self.pending.append(signum)
        elif self.caught is None:
            self.caught = signum

    def take_pending(self) -> List[int]:
        taken, self.pending = self.pending, []
        return taken

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

    def say(outcome: Outcome) -> None:
        log(outcome.message)
        out.write("".join(f"    {line}\n" for line in outcome.report))
        out.flush()

    with _SignalCatcher() as signals:
        for number in range(config.max_restarts + 1):
            if signals.caught:  # between attempts: do not start another one
                return 128 + signals.caught
            outcome = Attempt(plan, config, number, log, lambda: signals.caught, signals.take_pending, say).run()
            if outcome.state is State.SUCCEEDED:
                log("all ranks finished successfully", verbose=True)
                return 0
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
