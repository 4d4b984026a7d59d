"""The status channel between the workers and the launcher: variable names, message format, sender.

The launcher (launch/status_server.py) listens on a TCP port for the whole attempt; the shim of
each worker (launch/worker.py), distrib's exception hook (distrib/watch/crash_record.py) and distrib's
heartbeat (distrib/watch/heartbeat.py) report to it. A port replaces the files the reports used to be,
because a worker on another host cannot write into the launcher's ``/tmp``, and a run directory
need not be shared either. This is how Horovod's runner talks to its task services.

Anyone on the network can connect to that port, so every message carries an HMAC-SHA256 of its
body keyed by a secret the launcher makes for each attempt and gives only to its workers (in
their environment, as Horovod's runner does with ``HOROVOD_SECRET_KEY``); the launcher drops
messages whose digest does not match. A new secret per attempt also keeps a previous attempt's
late reports out of the next one.

On the wire, one message per line: ``<hex digest> <json body>\\n``. The body is a dict with
``kind`` and the record's fields. The workers send reports (``started``, ``ended``, ``raised``,
``beat``, and ``stacks`` / ``state`` when asked); the launcher sends requests back on the same
connection (``want_stacks`` to a rank's heartbeat, ``want_state`` and ``signal`` to a shim,
``notice`` to rank 0's heartbeat), signed the same way.

This module is the one place where ``launch/`` and ``distrib/`` meet: both import it, so the names
below exist once. It imports only the standard library (the launcher must start fast, and
``import distrib.anything`` would import torch). Sending is best-effort: every function here
returns False instead of raising, so a report that cannot be delivered never stops training.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import socket
import threading
from typing import List, Mapping, Optional, Sequence, Tuple

# The variables the launcher sets for every worker (values known only at run time).
ADDRESS_ENV = "DISTRIB_STATUS_ADDR"        # "198.18.0.1,127.0.0.1:40123": the launcher's addresses, its port
SECRET_ENV = "DISTRIB_STATUS_SECRET"       # hex key of this attempt's HMAC
HEARTBEAT_ENV = "DISTRIB_HEARTBEAT"        # "1" with --hang-timeout: distrib sends its beat count
RESTART_COUNT_ENV = "DISTRIB_RESTART_COUNT"  # 0 on the first attempt, i on restart i (read by distrib.watch.metrics)
STOP_GRACE_ENV = "DISTRIB_STOP_GRACE"      # seconds a shim gives its script between SIGTERM and SIGKILL
RUNTIME_ENV_NAMES = (ADDRESS_ENV, SECRET_ENV, RESTART_COUNT_ENV, STOP_GRACE_ENV)

# Where launchers put the global rank: torchrun and distrib-launch --engine torch (first: such a
# worker started inside a Slurm batch step also inherits the batch step's SLURM_PROCID=0),
# Horovod's Gloo launcher, Open MPI, PMIx (srun), SLURM.
RANK_VARIABLES = ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
KINDS = ("started", "ended", "raised", "beat", "stacks", "state")   # worker -> launcher
REQUESTS = ("want_stacks", "want_state", "signal", "notice")        # launcher -> worker
SHIM_REQUESTS = ("want_state", "signal")  # answered by the shim (launch/worker.py), the others by distrib
CONNECT_TIMEOUT_S = 2.0   # per address: an address of the launcher's that this host cannot route to
SEND_TIMEOUT_S = 5.0
MAX_LINE_BYTES = 1 << 20


def rank_from_env(env: Mapping[str, str]) -> Optional[int]:
    for name in RANK_VARIABLES:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def new_secret() -> str:
    return os.urandom(32).hex()


def digest(secret: str, body: bytes) -> str:
    return hmac.new(bytes.fromhex(secret), body, hashlib.sha256).hexdigest()


def encode(secret: str, message: Mapping) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return digest(secret, body).encode() + b" " + body + b"\n"


def decode(secret: str, line: bytes, kinds: Sequence[str] = KINDS) -> Optional[dict]:
    """The message of a signed line, or None when the digest is wrong or the body is not a message
    of one of ``kinds`` (reports by default; a worker reads the launcher's ``REQUESTS``)."""
    mac, _, body = line.rstrip(b"\n").partition(b" ")
    if not hmac.compare_digest(mac, digest(secret, body).encode()):
        return None
    try:
        message = json.loads(body)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("kind") in kinds else None


def parse_address(text: str) -> Tuple[Tuple[str, ...], int]:
    """``"a,b:port"`` -> ``(("a", "b"), port)``; raises ValueError when malformed."""
    hosts, _, port = text.rpartition(":")
    addresses = tuple(h for h in hosts.split(",") if h)
    if not addresses or not port.isdigit():
        raise ValueError(f"{ADDRESS_ENV}={text!r} is not 'address[,address...]:port'")
    return addresses, int(port)


def format_address(addresses: Sequence[str], port: int) -> str:
    return f"{','.join(addresses)}:{port}"


class Channel:
    """One connection to the launcher, opened on the first send to the first address that answers.

    Thread-safe. Never raises: :meth:`send` returns whether the message left; after a failure the
    next send connects again."""

    def __init__(self, addresses: Sequence[str], port: int, secret: str):
        self.addresses, self.port, self.secret = tuple(addresses), port, secret
        self.sock: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._inbox = b""  # a request line received in part (one reader: the thread that receives)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Optional["Channel"]:
        """The channel the launcher set up for this worker, or None when not run by the launcher."""
        env = os.environ if env is None else env
        if not env.get(ADDRESS_ENV) or not env.get(SECRET_ENV):
            return None
        try:
            addresses, port = parse_address(env[ADDRESS_ENV])
            bytes.fromhex(env[SECRET_ENV])
        except ValueError:
            return None
        return cls(addresses, port, env[SECRET_ENV])

    def connect(self) -> Optional[socket.socket]:
        with self._lock:
            return self._connect()

    def _connect(self) -> Optional[socket.socket]:
        if self.sock is not None:
            return self.sock
        for address in self.addresses:
            try:
                sock = socket.create_connection((address, self.port), timeout=CONNECT_TIMEOUT_S)
            except OSError:
                continue
            sock.settimeout(SEND_TIMEOUT_S)
            self.sock = sock
            return sock
        return None

    def send(self, message: Mapping) -> bool:
        data = encode(self.secret, message)
        with self._lock:
            for _ in range(2):  # a connection the launcher closed: one new one
                sock = self._connect()
                if sock is None:
                    return False
                try:
                    sock.sendall(data)
                    return True
                except OSError:
                    self._close()
            return False

    def receive(self, timeout: Optional[float]) -> Optional[List[dict]]:
        """The launcher's requests that arrive within ``timeout`` seconds (None: wait for one), or
        None when there is no connection or the launcher ended it (the connection is then closed).
        Call it from one thread only."""
        sock = self.sock
        if sock is None:
            return None
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
            if not ready:
                return []
            chunk = sock.recv(65536)
        except (OSError, ValueError):
            chunk = b""
        if not chunk:
            with self._lock:
                if self.sock is sock:
                    self._close()
            self._inbox = b""
            return None
        self._inbox += chunk
        *lines, self._inbox = self._inbox.split(b"\n")
        if len(self._inbox) > MAX_LINE_BYTES:
            self._inbox = b""
        return [m for m in (decode(self.secret, line, REQUESTS) for line in lines) if m is not None]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
