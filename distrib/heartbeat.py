"""Progress heartbeat for the launcher's hang detection (``python -m launch --hang-timeout S``).

distrib calls :func:`beat` before every collective it runs (the optimizer's gradient wait, the
preemption agreement, checkpoint agreement, evaluation); a script that runs collectives of its own
can call it too, before each of them. With ``--hang-timeout`` the launcher sets
``DISTRIB_HEARTBEAT_FILE_DIR`` and each rank's beat count appears in
``$DISTRIB_HEARTBEAT_FILE_DIR/heartbeat-<rank>``. Without the variable ``beat()`` does nothing.

Why a count and not a timestamp: when one rank stops, its peers stop too, blocked in the next
collective, so every heartbeat goes stale within a step of the others and their ages cannot tell
who is to blame. The counts can: every rank enters the same collectives in the same order, so a
peer blocked in a collective has beaten once more than the rank that never reached it (the
launcher blames the lowest count). Beating *before* the collective is what makes the difference.

Why a thread: ``beat()`` only increments an integer (it is on every step's path, and the file may
sit on NFS); a daemon thread writes the count once a second. It keeps writing while its rank is
blocked in a collective (Horovod releases the GIL there), so the file holds the count the rank
reached; a stopped process (SIGSTOP, a hang holding the GIL) stops writing, which the launcher uses
to break ties. Never raises: a heartbeat must not stop training.
"""
from __future__ import annotations

import os
import threading
from typing import Mapping, Optional

HEARTBEAT_DIR_ENV = "DISTRIB_HEARTBEAT_FILE_DIR"
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
WRITE_INTERVAL_S = 1.0


def heartbeat_path(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """This rank's heartbeat file, or None when hang detection is off (or the rank is unknown)."""
    env = os.environ if env is None else env
    folder = env.get(HEARTBEAT_DIR_ENV)
    rank = next((env[v] for v in RANK_VARIABLES if env.get(v, "").isdigit()), None)
    return os.path.join(folder, f"heartbeat-{rank}") if folder and rank is not None else None


def write_count(path: str, count: int) -> None:
    """Replace the file's content with ``count`` atomically (the launcher never reads half a number)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{count}\n")
        os.replace(tmp, path)
    except OSError:
        pass


class Heartbeat:
    """One process's beat count and the daemon thread that writes it to ``path`` every second."""

    def __init__(self, path: str, interval: float):
        self.path, self.interval = path, interval
        self.count = 0
        self.writing = False
        self._closed = threading.Event()

    def beat(self) -> None:
        self.count += 1
        if not self.writing:
            # The first beat is written at once: a rank that stops right after it is still judged.
            write_count(self.path, self.count)
            threading.Thread(target=self._write_forever, name="distrib-heartbeat", daemon=True).start()
            self.writing = True

    def close(self) -> None:
        """Stop the writer (a process simply exits; tests and tools that beat in-process call this)."""
        self._closed.set()

    def _write_forever(self) -> None:
        while not self._closed.wait(self.interval):
            write_count(self.path, self.count)


_heartbeat: Optional[Heartbeat] = None
_disabled = False  # no directory or no rank in this process's environment


def beat() -> None:
    """Tell the launcher this rank made progress. Costs an integer increment after the first call."""
    global _heartbeat, _disabled
    if _heartbeat is not None:
        _heartbeat.beat()
        return
    if _disabled:
        return
    path = heartbeat_path()
    if path is None:
        _disabled = True
        return
    _heartbeat = Heartbeat(path, WRITE_INTERVAL_S)
    _heartbeat.beat()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) has no writer thread and is not the rank: it starts over."""
    global _heartbeat, _disabled
    _heartbeat, _disabled = None, False


os.register_at_fork(after_in_child=_forget_in_child)
