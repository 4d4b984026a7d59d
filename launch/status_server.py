"""The launcher's end of the status channel (see launch/status_channel.py).

A TCP server that lives for one attempt: it accepts the workers' connections, checks every
message's HMAC with the attempt's secret, and keeps what it accepts in a :class:`ReportTable` in
memory, which the supervisor (launch/supervise.py, a thread of the same process) reads. Times in
the table are the launcher's clock at arrival, so that the first failure is found by one clock
even when the hosts' clocks disagree, and a rank whose beats stop arriving is seen as silent.

The connections carry requests back: :meth:`StatusServer.request` asks a rank's heartbeat for the
Python stacks of its threads (the hang report), a shim for its script's process state (a frozen
process cannot answer for itself) or to pass a signal to its script (SIGUSR2 for a worker on
another host, which the launcher cannot signal itself), or hands rank 0 a notice (a straggler,
for metrics.jsonl).

A shim keeps its connection open while its script runs: :meth:`StatusServer.stop_workers` shuts
those connections for writing and each shim, on any host, then stops its script (SIGTERM, SIGKILL
after the grace period). If the launcher itself dies, the kernel closes them, with the same effect.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import psutil

from launch.status_channel import (ADDRESS_ENV, MAX_LINE_BYTES, SECRET_ENV, SHIM_REQUESTS, decode, encode,
                                   format_address, new_secret)

ARRIVAL_FIELD = {"ended": "end_time", "raised": "time"}
CALLS_KEPT = 256  # per rank: the latest collectives entered, for the mismatch check
Key = Union[int, str]  # a rank, or "unknown-<pid>" for a shim that found no rank variable


def reachable_addresses() -> Tuple[str, ...]:
    """This host's IPv4 addresses on interfaces that are up: the others' first, loopback last (a
    worker on another host that tried 127.0.0.1 first would reach its own host)."""
    stats = psutil.net_if_stats()
    found, loopback = [], []
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET:
                (loopback if a.address.startswith("127.") else found).append(a.address)
    return tuple(found + (loopback or ["127.0.0.1"]))


def report_key(message: dict) -> Optional[Key]:
    """Whose report this is: its rank, ``unknown-<pid>`` for a shim without a rank, None when the
    rank is not a rank (a signed message of a buggy sender: refused)."""
    rank, pid = message.get("rank"), message.get("pid")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0:
        return rank
    if rank is None and isinstance(pid, int) and not isinstance(pid, bool) and message["kind"] != "beat":
        return f"unknown-{pid}"
    return None


@dataclass(frozen=True)
class Beat:
    """A rank's latest heartbeat (see distrib/watch/heartbeat.py)."""
    count: int             # beats so far: comparable across ranks
    heard: float           # the launcher's monotonic clock when it arrived: stops moving for a frozen rank
    step: Optional[int]    # the training step it reported, when it reports one
    pid: Optional[int]


@dataclass(frozen=True)
class Reports:
    """A copy of the table at one moment (the supervisor reads this, never the live table)."""
    started: Dict[Key, dict]
    ended: Dict[Key, dict]
    raised: Dict[Key, dict]
    beats: Dict[int, Beat]
    calls: Dict[int, Dict[int, tuple]]  # rank -> call number -> (name, shape, dtype) of the collective
    occurrences: Dict[int, Dict[int, int]]  # rank -> call number -> the how-many-th call of its name it was


class ReportTable:
    """Everything the workers reported in one attempt. The server's connection threads write it,
    the supervisor reads copies of it; one lock guards it."""

    def __init__(self, clock=time.monotonic, wall_clock=time.time):
        self._clock, self._wall = clock, wall_clock
        self._lock = threading.Lock()
        self._reports = Reports({}, {}, {}, {}, {}, {})
        self._windows: List[Tuple[int, int, Dict[str, float]]] = []  # (rank, step, ms per phase), untaken
        self._answers: Dict[Tuple[str, int], dict] = {}

    def add(self, key: Key, message: dict) -> None:
        """Store one accepted message; raises KeyError/TypeError/ValueError on a malformed one."""
        kind = message["kind"]
        record = {k: v for k, v in message.items() if k != "kind"}
        if kind in ARRIVAL_FIELD:
            record[ARRIVAL_FIELD[kind]] = self._wall()
        with self._lock:
            if kind == "beat":
                self._add_beat(key, message)
            elif kind in ("stacks", "state"):
                self._answers[(kind, key)] = record
            else:
                getattr(self._reports, kind)[key] = record

    def _add_beat(self, rank: int, message: dict) -> None:
        step = message.get("step")
        self._reports.beats[rank] = Beat(int(message["count"]), self._clock(),
                                         int(step) if step is not None else None, message.get("pid"))
        calls = self._reports.calls.setdefault(rank, {})
        occurrences = self._reports.occurrences.setdefault(rank, {})
        for seq, name, shape, dtype, occurrence in message.get("calls") or ():
            calls[int(seq)] = (str(name), tuple(shape) if shape is not None else None, dtype)
            occurrences[int(seq)] = int(occurrence)
        for seq in sorted(calls)[:-CALLS_KEPT]:
            del calls[seq]
            occurrences.pop(seq, None)
        for step, phases in message.get("windows") or ():
            self._windows.append((rank, int(step), {str(k): float(v) for k, v in phases.items()}))

    def read(self) -> Reports:
        with self._lock:
            r = self._reports
            return Reports(dict(r.started), dict(r.ended), dict(r.raised), dict(r.beats),
                           {rank: dict(calls) for rank, calls in r.calls.items()},
                           {rank: dict(o) for rank, o in r.occurrences.items()})

    def take_windows(self) -> List[Tuple[int, int, Dict[str, float]]]:
        """The per-rank step windows of phase times that arrived since the last call."""
        with self._lock:
            taken, self._windows = self._windows, []
        return taken

    def answer(self, kind: str, rank: int) -> Optional[dict]:
        """A rank's answer to a request (``stacks`` or ``state``), once it arrived."""
        with self._lock:
            return self._answers.get((kind, rank))

    def forget_answer(self, kind: str, rank: int) -> None:
        with self._lock:
            self._answers.pop((kind, rank), None)


class StatusServer:
    """Listens on every interface of this host, on a free port, until :meth:`close`; what the
    workers report is in :attr:`table`."""

    def __init__(self, secret: Optional[str] = None, addresses: Optional[Tuple[str, ...]] = None):
        self.secret = secret or new_secret()
        self.table = ReportTable()
        self.refused = 0  # messages with a wrong or missing signature, or not a message
        self._listener = socket.create_server(("", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.addresses = addresses or reachable_addresses()
        self._connections: List[socket.socket] = []
        self._reply_to: Dict[Tuple[str, int], socket.socket] = {}  # ("beat" | "started", rank) -> its connection
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="distrib-status", daemon=True)]
        self._threads[0].start()

    def env(self) -> Dict[str, str]:
        """What the workers need to report: the address list and this attempt's secret."""
        return {ADDRESS_ENV: format_address(self.addresses, self.port), SECRET_ENV: self.secret}

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.2)
                if not ready:
                    continue
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._connections.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="distrib-status-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self.handle(line, conn)
                if len(buffer) > MAX_LINE_BYTES:  # no newline in sight: not one of ours
                    self.refused += 1
                    return
        except OSError:
            return
        finally:
            conn.close()

    def handle(self, line: bytes, conn: Optional[socket.socket] = None) -> bool:
        """Check and store one line that arrived on ``conn``; returns whether it was accepted."""
        message = decode(self.secret, line)
        key = report_key(message) if message is not None else None
        if key is None:
            self.refused += 1
            return False
        try:
            self.table.add(key, message)
        except (TypeError, ValueError, KeyError, AttributeError):
            self.refused += 1
            return False
        if conn is not None and message["kind"] in ("beat", "started") and isinstance(key, int):
            with self._lock:
                self._reply_to[(message["kind"], key)] = conn
        return True

    def request(self, to_rank: int, kind: str, **fields) -> bool:
        """Send a request to rank ``to_rank``: ``want_stacks`` and ``notice`` go to its heartbeat,
        ``want_state`` and ``signal`` to its shim. False when that connection is unknown or broken."""
        with self._lock:
            conn = self._reply_to.get(("started" if kind in SHIM_REQUESTS else "beat", to_rank))
        if conn is None:
            return False
        data = encode(self.secret, {"kind": kind, **fields})
        try:  # never blocks: a peer that stopped reading (a frozen rank) must not hold the launcher
            return conn.send(data, socket.MSG_DONTWAIT) == len(data)
        except OSError:
            return False

    def stop_workers(self) -> None:
        """Tell every connected shim to stop its script: end our side of each connection."""
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self, drain_s: float = 1.0) -> None:
        """Stop listening; give the connections ``drain_s`` to deliver what is in flight."""
        self._closed.set()
        self.stop_workers()
        try:
            self._listener.close()
        except OSError:
            pass
        deadline = time.monotonic() + drain_s
        for t in self._threads[1:]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
                    conn.close()
                except OSError:
                    pass
