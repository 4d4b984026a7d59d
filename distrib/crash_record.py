"""Tell the launcher which rank raised, before any other rank can learn of it.

When one rank raises, Horovod shuts down (an ``atexit`` handler) and every other rank's pending
collective raises ``HorovodInternalError``. mpirun then kills whatever is left at once. The rank
that raised first is often still finalising (torch, Horovod's threads) when a peer has already
died of the follow-on error, so mpirun can kill its shim before the shim writes down how it
ended: the launcher would then see only the peers' follow-on errors and blame the wrong rank.

So :func:`install` (called by ``distrib.init()``) puts a ``sys.excepthook`` in place that writes
``$DISTRIB_STATUS_DIR/raised-<rank>.json``::

    {"rank": 1, "host": "node1", "pid": 4242, "time": 1764000000.1,
     "exception": "RuntimeError: injected failure at step 6", "traceback_tail": ["...", "..."]}

Python calls ``sys.excepthook`` for an uncaught exception *before* the ``atexit`` handlers, so the
record exists before Horovod shuts down. Without ``DISTRIB_STATUS_DIR`` (not under
``python -m launch``) nothing is installed. Never raises: reporting must not hide the exception.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from typing import Callable, Mapping, Optional

STATUS_DIR_ENV = "DISTRIB_STATUS_DIR"  # launch.plan.STATUS_DIR_ENV
TAIL_LINES = 20
MAX_MESSAGE_CHARS = 200


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for the launcher's one-line root cause."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."


def record_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"raised-{rank}.json")


def write_record(folder: str, rank: int, exc_type, exc: BaseException, tb) -> None:
    lines = "".join(traceback.format_exception(exc_type, exc, tb)).splitlines()
    record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
              "exception": describe(exc), "traceback_tail": [l for l in lines if l.strip()][-TAIL_LINES:]}
    path = record_path(folder, rank)
    tmp = f"{path}.tmp.{os.getpid()}"  # atomic: the launcher polls the folder
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def install(rank_of: Callable[[], int], env: Optional[Mapping[str, str]] = None) -> bool:
    """Chain a recording ``sys.excepthook`` (once per process); ``rank_of`` is asked at crash time
    because Horovod Elastic renumbers ranks. Returns whether a hook is in place."""
    env = os.environ if env is None else env
    folder = env.get(STATUS_DIR_ENV)
    if not folder:
        return False
    if getattr(sys.excepthook, "_distrib_crash_record", False):
        return True
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            try:
                write_record(folder, rank_of(), exc_type, exc, tb)
            except Exception:  # noqa: BLE001 - a full disk or a dead Horovod must not hide the traceback
                pass
        previous(exc_type, exc, tb)

    hook._distrib_crash_record = True
    sys.excepthook = hook
    return True
