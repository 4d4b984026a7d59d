"""Tell the launcher which rank raised, before any other rank can learn of it.

When one rank raises, Horovod shuts down (an ``atexit`` handler) and every other rank's pending
collective raises ``HorovodInternalError``. mpirun then kills whatever is left at once. The rank
that raised first is often still finalising (torch, Horovod's threads) when a peer has already
died of the follow-on error, so mpirun can kill its shim before the shim writes down how it
ended: the launcher would then see only the peers' follow-on errors and blame the wrong rank.

So :func:`install` (called by ``distrib.init()``) puts a ``sys.excepthook`` in place that sends
the launcher a ``raised`` report over the status channel (launch/status_channel.py; it works from
any host)::

    {"rank": 1, "host": "node1", "pid": 4242, "time": 1764000000.1,
     "exception": "RuntimeError: injected failure at step 6", "traceback_tail": ["...", "..."]}

Python calls ``sys.excepthook`` for an uncaught exception *before* the ``atexit`` handlers, so the
report has left before Horovod shuts down (the launcher keeps it in its table). The heartbeat's
latest collective records go first (:func:`distrib.watch.heartbeat.flush`): when the exception is
Horovod's own error about mismatched shapes, the launcher names the mismatch from them.
Not under ``python -m launch`` (no channel variables) nothing is installed. Never raises:
reporting must not hide the exception, and a report that cannot be delivered is dropped.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from typing import Callable, Mapping, Optional

from distrib.watch import heartbeat
from launch.status_channel import Channel

TAIL_LINES = 20
MAX_MESSAGE_CHARS = 200


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for the launcher's one-line root cause."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."


def record(rank: int, exc_type, exc: BaseException, tb) -> dict:
    lines = "".join(traceback.format_exception(exc_type, exc, tb)).splitlines()
    return {"kind": "raised", "rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
            "exception": describe(exc), "traceback_tail": [l for l in lines if l.strip()][-TAIL_LINES:]}


def install(rank_of: Callable[[], int], env: Optional[Mapping[str, str]] = None) -> bool:
    """Chain a recording ``sys.excepthook`` (once per process); ``rank_of`` is asked at crash time
    because Horovod Elastic renumbers ranks. Returns whether a hook is in place."""
    channel = Channel.from_env(os.environ if env is None else env)
    if channel is None:
        return False
    if getattr(sys.excepthook, "_distrib_crash_record", False):
        return True
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            try:
                heartbeat.flush()
                channel.send(record(rank_of(), exc_type, exc, tb))
                channel.close()
            except Exception:  # noqa: BLE001 - an unreachable launcher or a dead Horovod must not hide the traceback
                pass
        previous(exc_type, exc, tb)

    hook._distrib_crash_record = True
    sys.excepthook = hook
    return True
