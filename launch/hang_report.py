"""The lines that follow "rank R on H hung: ..." (pure): where the stuck rank is in its code and
in the job's collectives, and where every other rank is.

Inputs: the launcher's table (launch/status_server.py), the stuck rank's answer to
``want_stacks`` (distrib/watch/heartbeat.py: its threads' Python stacks) and, when that did not come,
its shim's answer to ``want_state`` (launch/worker.py: the process state the kernel reports). A
process stopped by a signal, or one holding the GIL in native code, cannot answer for itself; a
lost host (or a cut link) answers nothing at all: the report says which it is instead of a stack.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

from launch.collective_check import Call, describe_call
from launch.rank_reports import Hang
from launch.status_server import Reports

INDENT = "    "
SILENT_S = 2.5  # a rank's heartbeat sends once a second: older news of a rank is said to be old


def _where(rank: int, reports: Reports, hosts: Mapping[int, str], now: float) -> str:
    beat = reports.beats.get(rank)
    calls = reports.calls.get(rank, {})
    host = hosts.get(rank) or "?"
    if beat is None:
        return f"rank {rank} on {host}: no heartbeat yet"
    step = f"step {beat.step}" if beat.step is not None else "step ?"
    last = calls.get(beat.count)
    call = f"collective #{beat.count} {describe_call(last)}" if last else f"heartbeat {beat.count}"
    silent = now - beat.heard
    heard = f" (last heard {silent:.0f} s ago)" if silent > SILENT_S else ""
    return f"rank {rank} on {host} (pid {beat.pid}): {step}, {call}{heard}"


def _waited_for(hang: Hang, reports: Reports) -> Optional[str]:
    """The collective the peers wait in: the next one after the stuck rank's count."""
    waiting: Dict[Call, List[int]] = {}
    for rank, beat in sorted(reports.beats.items()):
        if rank != hang.rank and beat.count == hang.count + 1:  # beyond that, it is not waiting for this rank's next
            call = reports.calls.get(rank, {}).get(hang.count + 1)
            if call is not None:
                waiting.setdefault(call, []).append(rank)
    if not waiting:
        return None
    return "; ".join(f"{'rank' if len(r) == 1 else 'ranks'} {', '.join(map(str, r))} {'waits' if len(r) == 1 else 'wait'} for it in collective "
                     f"#{hang.count + 1} {describe_call(call)}" for call, r in waiting.items())


def _stack_lines(stacks: dict) -> List[str]:
    lines = [f"its Python stacks (innermost call last, pid {stacks.get('pid')}):"]
    for thread in stacks.get("threads") or ():
        tags = [t for t in ("main thread" if thread.get("main") else "",
                            f"entered collective #{thread['last_call']} last" if thread.get("last_call") else "") if t]
        lines.append(f"{INDENT}thread {thread.get('name')}{' (' + ', '.join(tags) + ')' if tags else ''}:")
        for filename, lineno, function, source in thread.get("frames") or ():
            lines.append(f"{INDENT * 2}File \"{filename}\", line {lineno}, in {function}")
            if source:
                lines.append(f"{INDENT * 3}{source}")
    return lines


def no_stack_reason(state: Optional[dict], host: str, waited_s: float) -> str:
    """Why there is no stack, from the shim's answer about the process (None: no answer)."""
    if state is None:
        return (f"no stack: neither the rank nor its shim on {host} answered within {waited_s:.1f} s: the host is "
                f"down or the launcher's link to it is cut")
    letter, name = state.get("state"), state.get("state_name")
    if letter in ("T", "t"):
        return (f"no stack: its process (pid {state.get('pid')}) is {name} (state {letter}, e.g. SIGSTOP): a frozen "
                f"process cannot report where it is")
    if letter in ("Z", "X", "?"):
        return f"no stack: its process (pid {state.get('pid')}) is {name}"
    wchan = f", waiting in the kernel at {state['wchan']}" if state.get("wchan") not in (None, "", "0") else ""
    return (f"no stack: its process (pid {state.get('pid')}) is {name} (state {letter}{wchan}) but did not answer "
            f"within {waited_s:.1f} s: it holds the Python GIL (native code that does not release it)")


def hang_lines(hang: Hang, reports: Reports, hosts: Mapping[int, str], stacks: Optional[dict],
               state: Optional[dict], waited_s: float, now: float) -> List[str]:
    """The report under the one-line verdict (``now``: the launcher's monotonic clock)."""
    lines = []
    calls = reports.calls.get(hang.rank, {})
    own = calls.get(hang.count)
    beat = reports.beats.get(hang.rank)
    stale = beat is not None and now - beat.heard > SILENT_S  # silent: what we know may be older than where it stopped
    heard = " the launcher heard of" if stale else ""
    own_text = (f"its last collective entered{heard} is #{hang.count} {describe_call(own)}" if own
                else f"it stopped at heartbeat {hang.count}")
    waited = _waited_for(hang, reports)
    lines.append(own_text + (f"; {waited}" if waited else ""))
    lines.append("where every rank is:")
    lines += [INDENT + _where(rank, reports, hosts, now) for rank in sorted(reports.beats)]
    if stacks is not None:
        lines += _stack_lines(stacks)
    else:
        lines.append(no_stack_reason(state, hosts.get(hang.rank) or "its host", waited_s))
    return lines
