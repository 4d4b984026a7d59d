"""Progress heartbeat for the launcher's hang detection (``python -m launch --hang-timeout S``).

distrib calls :func:`beat` before every collective it runs (the optimizer's gradient wait, the
preemption agreement, checkpoint agreement, evaluation); a script that runs collectives of its own
can call it too, before each of them. With ``--hang-timeout`` the launcher sets
``DISTRIB_HEARTBEAT=1`` and each rank sends its beat count over the status channel
(launch/status_channel.py: a TCP port of the launcher's, so it works from any host). Without the
variable, or without the channel, ``beat()`` does nothing.

Why a count and not a timestamp: when one rank stops, its peers stop too, blocked in the next
collective, so every heartbeat goes stale within a step of the others and their ages cannot tell
who is to blame. The counts can: every rank enters the same collectives in the same order, so a
peer blocked in a collective has beaten once more than the rank that never reached it (the
launcher blames the lowest count). Beating *before* the collective is what makes the difference.

Why a thread: ``beat()`` only increments an integer (it is on every step's path, and the
launcher may be slow to answer); a daemon thread sends the count once a second. It keeps sending while its rank is blocked in a collective (Horovod releases the GIL there),
so the launcher holds the count the rank reached; a stopped process (SIGSTOP, a hang holding the
GIL) stops sending, which the launcher uses to break ties. Never raises: a heartbeat must not stop
training, and a beat that cannot be delivered is dropped.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Mapping, Optional

from launch.status_channel import HEARTBEAT_ENV, Channel, rank_from_env

SEND_INTERVAL_S = 1.0


def heartbeat_sender(env: Optional[Mapping[str, str]] = None) -> Optional[Callable[[int], bool]]:
    """``send(count)`` for this rank, or None when hang detection is off (or the rank or channel is unknown)."""
    env = os.environ if env is None else env
    rank = rank_from_env(env)
    channel = Channel.from_env(env) if env.get(HEARTBEAT_ENV) == "1" else None
    if channel is None or rank is None:
        return None
    return lambda count: channel.send({"kind": "beat", "rank": rank, "count": count})


class Heartbeat:
    """One process's beat count and the daemon thread that sends it every ``interval`` seconds."""

    def __init__(self, send: Callable[[int], bool], interval: float):
        self.send, self.interval = send, interval
        self.count = 0
        self.sending = False
        self._closed = threading.Event()

    def beat(self) -> None:
        self.count += 1
        if not self.sending:
            # The first beat is sent at once, before the thread exists: a rank that stops right
            # after it (before the thread ever ran) is still judged. It connects to the launcher:
            # once per process, on the rank's own path.
            self.sending = True
            self._send(self.count)
            threading.Thread(target=self._send_forever, name="distrib-heartbeat", daemon=True).start()

    def close(self) -> None:
        """Stop the sender (a process simply exits; tests and tools that beat in-process call this)."""
        self._closed.set()

    def _send(self, count: int) -> None:
        try:
            self.send(count)
        except Exception:  # noqa: BLE001 - a heartbeat must never take the rank down
            pass

    def _send_forever(self) -> None:
        while not self._closed.wait(self.interval):
            self._send(self.count)


_heartbeat: Optional[Heartbeat] = None
_disabled = False  # hang detection off in this process's environment


def beat() -> None:
    """Tell the launcher this rank made progress. Costs an integer increment after the first call."""
    global _heartbeat, _disabled
    if _heartbeat is not None:
        _heartbeat.beat()
        return
    if _disabled:
        return
    send = heartbeat_sender()
    if send is None:
        _disabled = True
        return
    _heartbeat = Heartbeat(send, SEND_INTERVAL_S)
    _heartbeat.beat()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) has no sender thread and is not the rank: it starts over."""
    global _heartbeat, _disabled
    _heartbeat, _disabled = None, False


os.register_at_fork(after_in_child=_forget_in_child)
