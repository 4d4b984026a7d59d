"""What a rank tells the launcher while it runs: progress, the collectives it enters, its phase
times, and on request the Python stacks of its threads.

distrib calls :func:`beat` before every collective it runs (the communication layer names each
one: ``beat("allreduce.grads.0", shape, dtype)``); a script that runs collectives of its own can
call it too, before each of them. The launcher sets ``DISTRIB_HEARTBEAT=1`` and each rank sends,
once a second, over the status channel (launch/status_channel.py: a TCP port of the launcher's,
so it works from any host): its beat count, its step, the collectives entered since the last
send (call number, name, shape, dtype, and the how-many-th call of that name it is) and the phase times of each finished window of
``WINDOW_STEPS`` steps (:func:`step_done`, called by distrib.watch.metrics). Without the variable, or
without the channel, all of this does nothing.

What the launcher makes of it (launch/supervise.py):

* **Hangs.** When one rank stops, its peers stop too, blocked in the next collective, so every
  heartbeat goes stale within a step of the others and their ages cannot tell who is to blame.
  The counts can: every rank enters the same collectives in the same order, so a peer blocked in
  a collective has beaten once more than the rank that never reached it. Beating *before* the
  collective is what makes the difference. The launcher then asks the rank for its stacks
  (``want_stacks``): this thread answers with ``sys._current_frames()``, so the report shows the
  source line the rank is stuck on.
* **Mismatched collectives.** The k-th collective of every rank must be the same one with the
  same shape and dtype; the launcher compares the ranks' records and names the first difference
  (a skipped call, another order, another shape) instead of waiting out a hang.
* **Stragglers.** The phase times of the same window on every rank, compared.

Why a thread: :func:`beat` only increments an integer and appends a tuple (it is on every
collective's path, and the launcher may be slow to answer); the daemon thread does the sending
and answering. It keeps running while its rank is blocked in a collective or in I/O, or spins in
Python (the interpreter hands it the GIL every few milliseconds); a stopped process (SIGSTOP), or
one that holds the GIL in native code, stops sending and answers nothing: the launcher then asks
the rank's shim for its process state. Never raises: a heartbeat must not stop training, and a
report that cannot be delivered is dropped.
"""
from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import time
import traceback
from typing import Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from launch.status_channel import HEARTBEAT_ENV, Channel, rank_from_env

SEND_INTERVAL_S = 1.0
CALLS_KEPT = 64       # collectives remembered for the next send (more than a second's worth is not needed:
                      # a mismatch blocks the ranks at the mismatched call, which is then among the newest)
WINDOW_STEPS = 10     # steps per window of phase times; windows end at multiples, so they align across ranks
STACK_FRAMES = 12     # innermost frames per thread in a stack report
WAITING_PHASES = ("allreduce",)  # time spent waiting for the peers: a fast rank waits, it is not slow


def heartbeat_sender(env: Optional[Mapping[str, str]] = None) -> Optional[Tuple[Channel, int]]:
    """This rank's channel and rank, or None when the heartbeat is off (or the rank or channel is unknown)."""
    env = os.environ if env is None else env
    rank = rank_from_env(env)
    channel = Channel.from_env(env) if env.get(HEARTBEAT_ENV) == "1" else None
    if channel is None or rank is None:
        return None
    return channel, rank


def thread_stacks(skip: Sequence[int] = (), calls: Sequence[tuple] = ()) -> List[dict]:
    """Every Python thread's innermost frames, the main thread first: ``{"name", "main", "frames":
    [[file, line, function, source], ...], "last_call": n}`` where ``last_call`` is the number of
    the last collective that thread entered (from ``calls``: (n, name, shape, dtype, k, thread id))."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    last_call = {}
    for seq, *_, ident in calls:
        last_call[ident] = seq
    out = []
    for ident, frame in sys._current_frames().items():
        if ident in skip:
            continue
        frames = traceback.extract_stack(frame)[-STACK_FRAMES:]
        out.append({"name": names.get(ident, f"thread {ident:#x}"), "main": ident == main,
                    "last_call": last_call.get(ident),
                    "frames": [[f.filename, f.lineno, f.name, f.line or ""] for f in frames]})
    out.sort(key=lambda t: not t["main"])
    return out


class Heartbeat:
    """One process's beat count, collective records and phase windows, and the daemon thread
    that sends them every ``interval`` seconds and answers the launcher's requests.

    ``channel`` needs ``send(message) -> bool`` and ``receive(timeout) -> list | None`` (see
    launch.status_channel.Channel)."""

    def __init__(self, channel, rank: int, interval: float):
        self.channel, self.rank, self.interval = channel, rank, interval
        self.count = 0
        self.step: Optional[int] = None
        self.sending = False
        self.notices: Deque[dict] = collections.deque(maxlen=100)  # from the launcher, for rank 0's metrics
        self._calls: Deque[tuple] = collections.deque(maxlen=CALLS_KEPT)  # (n, name, shape, dtype, k, thread)
        self._entered: Dict[str, int] = {}  # name -> calls of it so far (the k-th call of a name pairs across ranks)
        self._sent_call = 0
        self._window: Dict[str, float] = {}
        self._window_steps, self._window_s = 0, 0.0
        self._windows: Deque[list] = collections.deque(maxlen=100)  # finished windows not yet sent
        self._closed = threading.Event()

    def beat(self, name: Optional[str] = None, shape: Optional[Sequence[int]] = None,
             dtype: Optional[str] = None) -> None:
        self.count += 1
        if name is not None:
            k = self._entered[name] = self._entered.get(name, 0) + 1
            self._calls.append((self.count, name, shape, dtype, k, threading.get_ident()))
        if not self.sending:
            # The first beat is sent at once, before the thread exists: a rank that stops right
            # after it (before the thread ever ran) is still judged. It connects to the launcher:
            # once per process, on the rank's own path.
            self.sending = True
            self.flush()
            threading.Thread(target=self._serve, name="distrib-heartbeat", daemon=True).start()
            # Registered after hvd.init(): runs before Horovod's own shutdown handler (last in, first out).
            atexit.register(self._exiting)

    def step_done(self, step: int, phases: Mapping[str, float], seconds: float) -> None:
        """Step ``step`` took ``seconds``, ``phases`` of them in named phases (seconds). Each
        window of WINDOW_STEPS steps goes out as ms per step per phase, waiting excluded."""
        self.step = step
        for name, value in phases.items():
            self._window[name] = self._window.get(name, 0.0) + value
        self._window_steps += 1
        self._window_s += seconds
        if step % WINDOW_STEPS == 0:
            n = self._window_steps
            ms = {name: 1000 * value / n for name, value in self._window.items()}
            ms["other"] = max(0.0, 1000 * self._window_s / n - sum(ms.values()))
            for name in WAITING_PHASES:
                ms.pop(name, None)
            self._windows.append([step, ms])
            self._window, self._window_steps, self._window_s = {}, 0, 0.0

    def _exiting(self) -> None:
        """The script is done and the process is exiting: that is progress too. Exiting (Horovod's
        shutdown, the interpreter's last garbage collection) can take seconds on a loaded host,
        and this thread stops when the interpreter finalises: without this beat that time would
        count against --hang-timeout from the rank's last collective on."""
        self.count += 1
        self.flush()

    def flush(self) -> None:
        """Send what there is now (the first beat; the exception hook, before the rank dies)."""
        calls = [c for c in list(self._calls) if c[0] > self._sent_call]
        windows = []
        while self._windows:
            windows.append(self._windows.popleft())
        message = {"kind": "beat", "rank": self.rank, "count": self.count, "step": self.step, "pid": os.getpid(),
                   "calls": [list(c[:5]) for c in calls], "windows": windows}
        if self._send(message) and calls:
            self._sent_call = calls[-1][0]

    def close(self) -> None:
        """Stop the sender (a process simply exits; tests and tools that beat in-process call this)."""
        self._closed.set()

    def _send(self, message: dict) -> bool:
        try:
            return bool(self.channel.send(message))
        except Exception:  # noqa: BLE001 - a heartbeat must never take the rank down
            return False

    def _serve(self) -> None:
        next_send = time.monotonic() + self.interval
        while not self._closed.is_set():
            wait = max(0.0, next_send - time.monotonic())
            try:
                requests = self.channel.receive(wait)
            except Exception:  # noqa: BLE001
                requests = None
            if requests is None:  # not connected: the next send connects again
                self._closed.wait(wait)
            for request in requests or ():
                self._answer(request)
            if time.monotonic() >= next_send:
                self.flush()
                next_send = time.monotonic() + self.interval

    def _answer(self, request: dict) -> None:
        if request.get("kind") == "want_stacks":
            self._send({"kind": "stacks", "rank": self.rank, "pid": os.getpid(), "count": self.count,
                        "threads": thread_stacks(skip=(threading.get_ident(),), calls=list(self._calls))})
        elif request.get("kind") == "notice":
            self.notices.append(request)


_heartbeat: Optional[Heartbeat] = None
_disabled = False  # the heartbeat is off in this process's environment


def _current() -> Optional[Heartbeat]:
    global _heartbeat, _disabled
    if _heartbeat is None and not _disabled:
        found = heartbeat_sender()
        if found is None:
            _disabled = True
        else:
            _heartbeat = Heartbeat(*found, SEND_INTERVAL_S)
    return _heartbeat


def beat(name: Optional[str] = None, shape: Optional[Sequence[int]] = None, dtype: Optional[str] = None) -> None:
    """Tell the launcher this rank made progress: call it before every collective, on every rank,
    naming the collective (its shape and dtype) when there is one. Costs an integer increment and
    a tuple append after the first call."""
    hb = _heartbeat if _heartbeat is not None else _current()
    if hb is not None:
        hb.beat(name, shape, dtype)


def entering(name: str, tensor) -> None:
    """:func:`beat` for a collective on ``tensor`` (anything with ``shape`` and ``dtype``)."""
    hb = _heartbeat if _heartbeat is not None else _current()
    if hb is not None:
        hb.beat(name, list(tensor.shape), str(tensor.dtype).replace("torch.", ""))


def step_done(step: int, phases: Mapping[str, float], seconds: float) -> None:
    """distrib.watch.metrics: this rank's phase times of step ``step`` (for the straggler check)."""
    hb = _heartbeat if _heartbeat is not None else _current()
    if hb is not None:
        hb.step_done(step, phases, seconds)


def take_notices() -> List[dict]:
    """The launcher's notices to this rank since the last call (stragglers, for rank 0's metrics)."""
    hb = _heartbeat
    taken = []
    while hb is not None and hb.notices:
        taken.append(hb.notices.popleft())
    return taken


def flush() -> None:
    """Send the latest beat and collective records now (the exception hook, before Horovod shuts down)."""
    if _heartbeat is not None:
        _heartbeat.flush()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) has no sender thread and is not the rank: it starts over."""
    global _heartbeat, _disabled
    _heartbeat, _disabled = None, False


os.register_at_fork(after_in_child=_forget_in_child)
