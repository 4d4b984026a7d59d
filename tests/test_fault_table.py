"""The launcher's report for each kind of fault a job meets (issue: "when a job goes wrong").

One tiny script (tests/scripts/faults.py: a loop of compute and two named allreduces through real
Horovod) injects one fault at a time on rank 1, under ``python -m launch -np 2 --hang-timeout 3``.
Each case asserts what the report must say: the rank and host to blame, and for a process that
is still alive the source line it is stuck on (the line carrying the fault's ``FAULT:`` comment);
for a frozen process or a lost host, that there is no stack and why; for a mismatch, the ranks,
the collective and the shapes; for a slow rank, the straggler with its host and slow phase.
"""
import json
import re
import socket
import sys

import pytest

from tests.helpers import SCRIPTS, run_launch
from tests.nodes import nodes  # noqa: F401 - the session's cluster (the lost-host case)

pytestmark = pytest.mark.multiprocess
FAULTS = SCRIPTS / "faults.py"
HOST = socket.gethostname()


def line_of(marker: str) -> int:
    """The line of faults.py whose comment is ``# FAULT: <marker>``."""
    lines = FAULTS.read_text().splitlines()
    found = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# FAULT: {marker}")]
    assert len(found) == 1, marker
    return found[0]


def points_at(stderr: str, marker: str) -> bool:
    """The report's stack (or the traceback) shows faults.py at the fault's line, with its source."""
    return (f'faults.py", line {line_of(marker)}, in ' in stderr) and f"# FAULT: {marker}" in stderr


def launch(fault: str, *script_args, hang_timeout: float = 3):
    return run_launch(["-np", "2", "--hang-timeout", f"{hang_timeout:g}"], FAULTS,
                      ["--fault", fault, *script_args], check=False, timeout=240)


def hung_rank_1(stderr: str) -> bool:
    return re.search(rf"^distrib-launch: rank 1 on {re.escape(HOST)} hung: no progress for \d+ s at heartbeat "
                     rf"\d+, the furthest rank is at \d+", stderr, re.M) is not None


def where_every_rank_is(stderr: str) -> dict:
    """rank -> its line under "where every rank is" (host, pid, step or "?", collective)."""
    found = re.findall(r"^ {8}rank (\d+) on (\S+) \(pid (\d+)\): step (\d+|\?), (.*)$", stderr, re.M)
    return {int(r): (host, int(pid), int(step) if step != "?" else None, where) for r, host, pid, step, where in found}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault, markers", [
    ("loop", ["spins"]),
    ("io", ["blocked in I/O"]),
    ("deadlock", ["deadlock, main side", "deadlock, thread side"]),
])
def test_a_live_hung_rank_is_named_with_its_source_line(fault, markers):
    """Rank 1 stops at step 5 before collective #9 while rank 0 waits in it: the report names
    rank 1, its host and pid, where both ranks are, and the stuck thread's source lines."""
    proc = launch(fault)
    err = proc.stderr
    assert proc.returncode == 1 and hung_rank_1(err), err[-3000:]
    assert ("its last collective entered is #8 'allreduce:grads.b' float64[3]; rank 0 waits for it in "
            "collective #9 'allreduce:grads.a' float64[4]") in err, err[-3000:]
    where = where_every_rank_is(err)
    assert where[0][0] == where[1][0] == HOST and where[0][2] == where[1][2] == 4, err[-3000:]
    assert where[0][3] == "collective #9 'allreduce:grads.a' float64[4]"
    assert where[1][3] == "collective #8 'allreduce:grads.b' float64[3]"
    assert f"its Python stacks (innermost call last, pid {where[1][1]}):" in err
    assert "thread MainThread (main thread, entered collective #8 last):" in err
    for marker in markers:
        assert points_at(err, marker), err[-3000:]


@pytest.mark.timeout(300)
def test_a_frozen_rank_has_no_stack_and_the_report_says_why():
    proc = launch("sigstop")
    err = proc.stderr
    assert proc.returncode == 1 and hung_rank_1(err), err[-3000:]
    pid = where_every_rank_is(err)[1][1]
    assert (f"no stack: its process (pid {pid}) is stopped by a signal (state T, e.g. SIGSTOP): a frozen process "
            f"cannot report where it is") in err, err[-3000:]
    assert "its Python stacks" not in err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault, expected", [
    ("skip", "collective mismatch at collective #9: rank 0 on {h} entered 'allreduce:grads.a' float64[4]; "
             "rank 1 on {h} entered 'allreduce:grads.b' float64[3]"),
    ("shape", "collective mismatch at collective #9: rank 0 on {h} entered 'allreduce:grads.a' float64[4]; "
              "rank 1 on {h} entered 'allreduce:grads.a' float64[5]"),
])
def test_a_mismatched_collective_fails_with_the_ranks_the_collective_and_the_shapes(fault, expected):
    """A skipped collective would hang until the timeout, another shape would end in Horovod's
    error that names no rank: both end in one line that names them."""
    proc = launch(fault, hang_timeout=600)  # no hang verdict can come first
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert f"distrib-launch: {expected.format(h=HOST)}" in err.splitlines(), err[-3000:]
    assert "hung" not in err and "failed first" not in err


@pytest.mark.timeout(300)
def test_a_killed_rank_is_named_and_a_healthy_run_flags_no_straggler():
    """SIGKILL at step 45: the report names rank 1 and its host; the 44 healthy steps before it
    (4 windows of phase times compared) flagged no rank."""
    proc = launch("sigkill", "--at", "45", "--steps", "50")
    err = proc.stderr
    assert proc.returncode == 137, err[-3000:]
    assert f"distrib-launch: rank 1 on {HOST} failed first: killed by SIGKILL" in err.splitlines(), err[-3000:]
    assert "straggler" not in err


@pytest.mark.timeout(300)
def test_an_exception_inside_a_collective_is_named_with_its_source_line():
    proc = launch("exception")
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert (f"distrib-launch: rank 1 on {HOST} failed first: exit code 1 (uncaught RuntimeError: injected failure "
            f"inside grads.a)") in err.splitlines(), err[-3000:]
    report = err[err.index("failed first"):]  # the traceback under the verdict, not the rank's own stderr
    assert points_at(report, "raises in a collective"), report


@pytest.mark.timeout(300)
def test_a_slow_rank_is_flagged_with_its_host_and_phase(tmp_path):
    """Rank 1's compute takes 1.5 times as long: flagged within 50 steps, in the launcher's log
    and in rank 0's metrics.jsonl (the script stops once the event is there)."""
    proc = launch("slow", "--steps", "1000", "--run-dir", tmp_path / "run", hang_timeout=600)
    err = proc.stderr
    assert proc.returncode == 0, err[-3000:]
    flagged = [line for line in err.splitlines() if "straggler" in line]
    assert len(flagged) == 1 and flagged[0].startswith(f"distrib-launch: rank 1 on {HOST} is a straggler: "), err[-3000:]
    assert "slowest phase compute" in flagged[0]
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stragglers = [e for e in events if e.get("event") == "straggler"]
    assert len(stragglers) == 1, stragglers
    event = stragglers[0]
    assert (event["rank"], event["host"], event["phase"]) == (1, HOST, "compute")
    assert event["flagged_step"] <= 50 and event["ratio"] > 1.25


@pytest.mark.timeout(400)
def test_a_lost_host_has_no_stack_and_the_report_says_why(nodes):
    """Rank 1 on node2 takes node2's link down at step 5: neither it nor its shim can answer, and
    the report says so instead of a stack."""
    nodes.heal()
    try:
        proc = nodes.run("node1", [sys.executable, "-m", "launch", "--controller", "gloo", "-H", "node1:1,node2:1",
                                   "--hang-timeout", "3", str(FAULTS), "--fault", "linkdown"],
                         timeout=300, check=False)
    finally:
        nodes.heal()
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert re.search(r"^distrib-launch: rank 1 on node2 hung: no progress for \d+ s", err, re.M), err[-3000:]
    assert "no stack: neither the rank nor its shim on node2 answered within" in err, err[-3000:]
    assert "the host is down or the launcher's link to it is cut" in err
