"""The launcher's end of the status channel (see launch/status_channel.py).

A TCP server that lives for one attempt: it accepts the workers' connections, checks every
message's HMAC with the attempt's secret, and writes what it accepts into a folder on the
launcher's own host as the files launch/rank_reports.py reads (``started-<r>.json``,
``rank-<r>.json``, ``raised-<r>.json``, ``heartbeat-<r>``). Times in those files are the
launcher's clock at arrival, so that the first failure is found by one clock even when the hosts'
clocks disagree; a heartbeat file's mtime is when its last beat arrived.

A shim keeps its connection open while its script runs: :meth:`StatusServer.stop_workers` shuts
those connections for writing and each shim, on any host, then stops its script (SIGTERM, SIGKILL
after the grace period). If the launcher itself dies, the kernel closes them, with the same effect.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

import psutil

from launch.status_channel import (ADDRESS_ENV, MAX_LINE_BYTES, SECRET_ENV, decode, format_address, new_secret)
from launch.worker import write_json

FILE_PREFIX = {"started": "started-", "ended": "rank-", "raised": "raised-"}
ARRIVAL_FIELD = {"ended": "end_time", "raised": "time"}


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


def file_name(message: dict) -> Optional[str]:
    """The file a message becomes, or None when its rank is not a rank (the file name comes from it)."""
    rank, pid = message.get("rank"), message.get("pid")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0:
        who = str(rank)
    elif rank is None and isinstance(pid, int):  # a shim that found no rank variable
        who = f"unknown-{pid}"
    else:
        return None
    kind = message["kind"]
    return f"heartbeat-{who}" if kind == "beat" else f"{FILE_PREFIX[kind]}{who}.json"


class StatusServer:
    """Listens on every interface of this host, on a free port, until :meth:`close`."""

    def __init__(self, folder: str, secret: Optional[str] = None, addresses: Optional[Tuple[str, ...]] = None):
        self.folder = folder
        self.secret = secret or new_secret()
        self.refused = 0  # messages with a wrong or missing signature, or not a message
        self._listener = socket.create_server(("", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.addresses = addresses or reachable_addresses()
        self._connections: List[socket.socket] = []
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
                    self.handle(line)
                if len(buffer) > MAX_LINE_BYTES:  # no newline in sight: not one of ours
                    self.refused += 1
                    return
        except OSError:
            return
        finally:
            conn.close()

    def handle(self, line: bytes) -> bool:
        """Check and store one line; returns whether it was accepted."""
        message = decode(self.secret, line)
        name = file_name(message) if message is not None else None
        if name is None:
            self.refused += 1
            return False
        path = os.path.join(self.folder, name)
        try:
            if message["kind"] == "beat":
                count = int(message["count"])
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    f.write(f"{count}\n")
                os.replace(tmp, path)
            else:
                record = {k: v for k, v in message.items() if k != "kind"}
                if message["kind"] in ARRIVAL_FIELD:
                    record[ARRIVAL_FIELD[message["kind"]]] = time.time()
                write_json(path, record)
        except (OSError, TypeError, ValueError, KeyError):
            self.refused += 1
            return False
        return True

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
