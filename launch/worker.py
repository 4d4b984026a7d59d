"""``python -m launch.worker script.py [args]``: the shim each worker runs under the launcher.

It runs the training script as a child process, so that even a script killed by SIGKILL is seen
ending. The child's stdout passes through untouched; its stderr is copied through as it comes
while the last lines are kept. SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to the
child. It reports to the launcher over the status channel (launch/status_channel.py), which works
from any host: at start ``started`` (rank, host, pid, shim_pid, so that the supervisor can stop the
rank's processes itself when they run on its host), and when the child ends ``ended``::

    {"rank": 1, "host": "node1", "pid": 4242, "exit_code": 137, "signal": "SIGKILL",
     "end_time": 1764000000.1, "stderr_tail": ["...", "..."]}

then exits with the child's code (128 + N for a signal N). While the script runs the shim keeps
its connection open and answers the launcher's ``want_state`` with the script's process state
(``T`` for a process stopped by SIGSTOP, which cannot answer for itself; no answer at all means
the host or its link is gone), and passes the signal of a ``signal`` request to the script as if
the shim had received it (SIGUSR2 for the workers of other hosts: preemption); when the launcher ends the connection (the attempt is being
stopped, or the launcher died) the shim stops the script: SIGCONT and SIGTERM, SIGKILL after
``DISTRIB_STOP_GRACE`` seconds. That is how a worker on another host is stopped even when mpirun or horovodrun cannot
reach it. Without the channel's variables (run by hand), or when the launcher cannot be reached,
it reports nothing and the script runs all the same.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Deque, List, Mapping

from launch.status_channel import STOP_GRACE_ENV, Channel, rank_from_env

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024
_PR_SET_PDEATHSIG = 1
DEFAULT_STOP_GRACE_S = 5.0


def exit_status(returncode: int) -> tuple:
    """Popen returncode -> (exit code as a shell reports it, signal name or None)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return 128 - returncode, name
    return returncode, None


def tail_lines(data: bytes, n: int = TAIL_LINES) -> List[str]:
    text = data.decode("utf-8", errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-n:]


def _die_with_parent() -> None:
    # In the child before exec: if the shim is SIGKILLed, the kernel kills the script too,
    # instead of leaving it running (and holding its peers in a collective) as an orphan.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _pump(source, sink, tail: Deque[bytes]) -> None:
    """Copy the child's stderr to ours chunk by chunk (progress bars without newlines too)."""
    fd = source.fileno()
    kept = 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        try:
            sink.write(chunk)
            sink.flush()
        except (OSError, ValueError):
            pass  # our stderr is gone (launcher stopped); keep the tail anyway
        tail.append(chunk)
        kept += len(chunk)
        while kept - len(tail[0]) > _TAIL_BYTES:
            kept -= len(tail.popleft())


PROCESS_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped by a signal",
                  "t": "stopped by a debugger", "Z": "a zombie", "X": "dead"}


def process_state(pid: int) -> dict:
    """What the kernel says of ``pid``: its state letter and word, and where it sleeps (wchan)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            letter = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return {"state": "?", "state_name": "gone"}
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
    except OSError:
        wchan = ""
    return {"state": letter, "state_name": PROCESS_STATES.get(letter, letter), "wchan": wchan}


def forward_requested_signal(child: subprocess.Popen, name) -> bool:
    """The launcher's ``signal`` request: pass the named signal (one of FORWARDED_SIGNALS, as a
    signal sent to the shim itself would be) to the script. This is how SIGUSR2 reaches a worker
    on another host, which the launcher cannot signal (ssh does not carry signals). Returns whether
    the signal was sent; any other name is ignored."""
    allowed = {sig.name: sig for sig in FORWARDED_SIGNALS}
    if name not in allowed or child.poll() is not None:
        return False
    try:
        child.send_signal(allowed[name])
    except ProcessLookupError:
        return False
    return True


def _serve_launcher(channel: Channel, child: subprocess.Popen, grace: float, rank, host: str) -> None:
    """In a thread: answer the launcher's ``want_state``, pass on its ``signal``; once it ended
    our connection (it is stopping the attempt, or it died), stop the script as the launcher
    would, SIGTERM then SIGKILL after ``grace`` seconds."""
    while True:
        requests = channel.receive(None)
        if requests is None:
            break
        for request in requests:
            if request["kind"] == "want_state":
                channel.send({"kind": "state", "rank": rank, "host": host, "pid": child.pid,
                              **process_state(child.pid)})
            elif request["kind"] == "signal":
                forward_requested_signal(child, request.get("signal"))
    if child.poll() is not None:
        return  # the script ended first: the shim is finishing and closed its own side
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            return
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()


def run(argv: List[str], env: Mapping[str, str]) -> int:
    channel = Channel.from_env(env)
    rank = rank_from_env(env)
    host = socket.gethostname()
    child = subprocess.Popen([sys.executable, *argv], stderr=subprocess.PIPE, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}

    if channel is not None and channel.send({"kind": "started", "rank": rank, "host": host, "pid": child.pid,
                                             "shim_pid": os.getpid(), "start_time": time.time()}):
        try:
            grace = float(env.get(STOP_GRACE_ENV) or DEFAULT_STOP_GRACE_S)
        except ValueError:
            grace = DEFAULT_STOP_GRACE_S
        threading.Thread(target=_serve_launcher, args=(channel, child, grace, rank, host), daemon=True).start()
    tail: Deque[bytes] = deque()
    pump = threading.Thread(target=_pump, args=(child.stderr, sys.stderr.buffer, tail), daemon=True)
    pump.start()
    returncode = child.wait()
    end_time = time.time()
    pump.join(timeout=2.0)  # a grandchild holding the pipe open must not keep us here
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    code, signame = exit_status(returncode)
    if channel is not None:
        channel.send({"kind": "ended", "rank": rank, "host": host, "pid": child.pid, "exit_code": code,
                      "signal": signame, "end_time": end_time, "stderr_tail": tail_lines(b"".join(list(tail)))})
        channel.close()
    return code


def script_argv(argv: List[str]) -> List[str]:
    """``script.py [--] args`` -> ``script.py args``: the launcher puts "--" after the script so
    that horovodrun's parser leaves the script's flags alone (see launch/plan.py)."""
    return argv[:1] + argv[2:] if argv[1:2] == ["--"] else argv


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m launch.worker script.py [--] [args]\n")
        sys.exit(2)
    sys.exit(run(script_argv(sys.argv[1:]), os.environ))


if __name__ == "__main__":
    main()
