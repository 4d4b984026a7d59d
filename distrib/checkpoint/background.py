"""One checkpoint write at a time, in a thread when saving asynchronously.

Rank 0's checkpoint writer and every rank's shard writer (ZeRO) both need the same three
things: run the write now or in the background, wait for it before the next one, and never lose
its failure (a full disk in the background must still fail the next ``save()`` in one line).
"""
from __future__ import annotations

import threading
from typing import Callable, Optional


class BackgroundWrite:
    """Runs ``write(*args)`` (which returns None or its failure in one line) at most one at a
    time; :meth:`join` waits for it and hands its failure over once."""

    def __init__(self, name: str):
        self._name = name
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[str] = None  # set by the write, handed over by join()

    def run(self, write: Callable[..., Optional[str]], *args, asynchronous: bool) -> None:
        """Start ``write(*args)`` in a thread (``asynchronous``) or run it now. Call
        :meth:`join` first: a write still in flight is a caller's bug."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name}: a write is still in flight; join() it first")
        if not asynchronous:
            self._record(write, args)
            return
        # Not a daemon: the interpreter waits for a checkpoint being written at exit.
        self._thread = threading.Thread(target=self._record, args=(write, args), name=self._name, daemon=False)
        self._thread.start()

    def _record(self, write: Callable[..., Optional[str]], args) -> None:
        try:
            failure = write(*args)
        except BaseException as exc:  # a background failure must never be lost
            failure = f"{self._name}: {type(exc).__name__}: {exc}"
        if failure:
            self._failure = self._failure or failure

    def wait(self) -> None:
        """Wait for the write in flight, keeping its failure for :meth:`join`."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def join(self) -> Optional[str]:
        """Wait for the write in flight; its failure (one line), or None. Hands it over once."""
        self.wait()
        problem, self._failure = self._failure, None
        return problem
