"""The launcher's pure verdicts on what the workers report: mismatched collectives
(launch/collective_check.py), stragglers (launch/stragglers.py), the hang report's lines
(launch/hang_report.py) and who is blamed for a hang when the beats arrive out of phase."""
import pytest

from launch.collective_check import first_mismatch
from launch.hang_report import hang_lines, no_stack_reason
from launch.rank_reports import Hang, Progress, hung_rank
from launch.status_server import Beat, Reports
from launch.stragglers import StragglerWatch

A = ("allreduce.grads.a", (4,), "float64")
B = ("allreduce.grads.b", (3,), "float64")


def occurrences(calls):
    """What each rank's heartbeat counts: the how-many-th call of its name each call is."""
    out = {}
    for rank, per_rank in calls.items():
        seen = {}
        for n in sorted(per_rank):
            seen[per_rank[n][0]] = seen.get(per_rank[n][0], 0) + 1
            out.setdefault(rank, {})[n] = seen[per_rank[n][0]]
    return out


def mismatch(calls, stalled_at=None):
    found = first_mismatch(calls, occurrences(calls), stalled_at)
    return found.describe() if found else None


@pytest.mark.parametrize("calls, stalled_at, expected", [
    ({0: {1: A, 2: B}, 1: {1: A, 2: B}}, 2, None),
    ({0: {1: A, 2: B, 3: A}, 1: {1: A}}, None, None),    # rank 1 has not got there yet: not judged
    ({0: {1: A}, 1: {1: B}}, 1,                          # a skip (rank 0 blocked in A, rank 1 in B)
     "collective mismatch at collective #1: rank 0 entered 'allreduce.grads.a' float64[4]; "
     "rank 1 entered 'allreduce.grads.b' float64[3]"),
    ({0: {4: B, 5: A}, 1: {4: B, 5: B}}, 5,              # another order: rank 1 never entered A
     "collective mismatch at collective #5: rank 0 entered 'allreduce.grads.a' float64[4]; "
     "rank 1 entered 'allreduce.grads.b' float64[3]"),
    ({0: {1: A, 2: B}, 1: {1: B}, 2: {1: A, 2: B}}, 1,   # the majority shows what rank 1 skipped
     "collective mismatch at collective #1: ranks 0, 2 entered 'allreduce.grads.a' float64[4]; "
     "rank 1 entered 'allreduce.grads.b' float64[3] (rank 1 skipped 'allreduce.grads.a' float64[4])"),
    ({0: {3: A}, 1: {3: ("allreduce.grads.a", (5,), "float64")}}, None,   # no need to wait for a stall
     "collective mismatch at collective #3: rank 0 entered 'allreduce.grads.a' float64[4]; "
     "rank 1 entered 'allreduce.grads.a' float64[5]"),
    ({0: {3: A}, 1: {3: ("allreduce.grads.a", (4,), "float32")}}, None,
     "collective mismatch at collective #3: rank 0 entered 'allreduce.grads.a' float64[4]; "
     "rank 1 entered 'allreduce.grads.a' float32[4]"),
])
def test_first_mismatch_names_the_ranks_the_collective_and_the_shapes(calls, stalled_at, expected):
    assert mismatch(calls, stalled_at) == expected


def test_asynchronous_calls_started_in_another_order_are_no_mismatch():
    """Gradient buckets may start in another order on each rank (the engine pairs them by name):
    while the job moves, only the k-th call of each name is compared; a stall compares the
    lowest count, where both ranks are in the same collective again."""
    calls = {0: {1: A, 2: B, 3: A}, 1: {1: B, 2: A, 3: A}}
    assert mismatch(calls) is None
    assert mismatch(calls, stalled_at=3) is None
    # Both started both, in other orders, and wait (a long allreduce): a stall, no mismatch.
    assert mismatch({0: {1: A, 2: B}, 1: {1: B, 2: A}}, stalled_at=1) is None
    assert mismatch({0: {1: A, 2: B}, 1: {1: B, 2: A}}, stalled_at=2) is None
    other_shape = {0: {1: A, 2: B}, 1: {1: ("allreduce.grads.b", (2,), "float64"), 2: A}}
    assert mismatch(other_shape) == ("collective mismatch at collective #1: rank 0 entered 'allreduce.grads.b' "
                                     "float64[3]; rank 1 entered 'allreduce.grads.b' float64[2]")


def test_a_mismatch_names_the_hosts_when_known():
    calls = {0: {1: A}, 1: {1: B}}
    found = first_mismatch(calls, occurrences(calls), 1)
    assert found.ranks == (0, 1)
    assert found.describe({0: "node1", 1: "node2"}).startswith(
        "collective mismatch at collective #1: rank 0 on node1 entered 'allreduce.grads.a'")


def window(compute, other=0.5):
    return {"compute": compute, "data": 0.2, "other": other}


def feed(watch, per_rank_compute, windows, start=0):
    found = []
    for w in range(start, start + windows):
        for rank, compute in per_rank_compute.items():
            found += watch.add(rank, 10 * (w + 1), window(compute))
    return found


def test_a_rank_slower_in_three_windows_of_four_is_a_straggler_once():
    watch = StragglerWatch()
    assert feed(watch, {0: 10.0, 1: 15.0, 2: 10.2}, 2) == []   # two slow windows: not yet
    found = feed(watch, {0: 10.0, 1: 15.0, 2: 10.2}, 1, start=2)
    assert [(s.rank, s.phase, s.step, s.first_step) for s in found] == [(1, "compute", 30, 1)]
    assert found[0].ratio == pytest.approx(15.7 / 10.8, rel=1e-3)
    assert found[0].describe("node2").startswith("rank 1 on node2 is a straggler: 1.45x its peers' work")
    assert feed(watch, {0: 10.0, 1: 15.0, 2: 10.2}, 3, start=3) == []  # reported once


def test_one_disturbed_window_neither_hides_a_slow_rank_nor_flags_a_healthy_one():
    watch = StragglerWatch()
    found = []
    for w, compute in enumerate([15.0, 15.0, 10.0, 15.0]):  # the third window: other work slowed rank 0 too
        found += feed(watch, {0: 10.0, 1: compute}, 1, start=w)
    assert [(s.rank, s.step, s.first_step) for s in found] == [(1, 40, 1)]
    healthy = StragglerWatch()
    # 1.2x is within the threshold; a 1.5x window every other window is never 3 of 4.
    assert feed(healthy, {0: 10.0, 1: 12.0}, 5) == []
    for w in range(5, 15):
        slow = 15.0 if w % 2 else 10.0
        assert feed(healthy, {0: 10.0, 1: slow}, 1, start=w) == []
    # Sub-millisecond steps: 2x but a fraction of a millisecond is noise, not a straggler.
    tiny = StragglerWatch()
    for w in range(5):
        for rank, compute in {0: 0.1, 1: 0.2}.items():
            assert tiny.add(rank, 10 * (w + 1), {"compute": compute}) == []


def test_a_window_is_judged_only_once_every_rank_sent_it():
    watch = StragglerWatch()
    for w in range(3):  # rank 1's windows come in late, all at once
        assert watch.add(0, 10 * (w + 1), window(10.0)) == []
    found = []
    for w in range(3):
        found += watch.add(1, 10 * (w + 1), window(20.0))
    assert [s.rank for s in found] == [1]


def test_the_peer_whose_standstill_was_seen_first_is_not_blamed():
    """Rank 0 waits in collective #9 and its count was seen a second before rank 1's #8 (the beats
    arrive out of phase): without slack rank 0 alone passed the timeout; with it, rank 1 is blamed."""
    progress = {0: Progress(9, since=0.0, heard=9.0), 1: Progress(8, since=0.9, heard=9.0)}
    assert hung_rank(progress, [], timeout=3.0, now=3.5).rank == 0
    hang = hung_rank(progress, [], timeout=3.0, now=3.5, slack=2.0)
    assert (hang.rank, hang.count, hang.furthest) == (1, 8, 9)
    assert hung_rank(progress, [], timeout=3.0, now=2.9, slack=2.0) is None  # nobody passed the timeout yet


def reports():
    return Reports(started={}, ended={}, raised={},
                   beats={0: Beat(9, heard=99.5, step=4, pid=100), 1: Beat(8, heard=90.0, step=4, pid=101)},
                   calls={0: {8: B, 9: A}, 1: {7: A, 8: B}}, occurrences={0: {8: 4, 9: 5}, 1: {7: 4, 8: 4}})


def test_a_hang_report_says_where_every_rank_is_and_which_collective_is_waited_for():
    stacks = {"pid": 101, "threads": [{"name": "MainThread", "main": True, "last_call": 8,
                                       "frames": [["train.py", 12, "main", "while True: pass"]]}]}
    lines = hang_lines(Hang(1, 5.0, 8, 9), reports(), {0: "node1", 1: "node2"}, stacks, None, 2.0, now=100.0)
    assert lines == [
        "its last collective entered the launcher heard of is #8 'allreduce.grads.b' float64[3]; rank 0 waits for "
        "it in collective #9 'allreduce.grads.a' float64[4]",
        "where every rank is:",
        "    rank 0 on node1 (pid 100): step 4, collective #9 'allreduce.grads.a' float64[4]",
        "    rank 1 on node2 (pid 101): step 4, collective #8 'allreduce.grads.b' float64[3] (last heard 10 s ago)",
        "its Python stacks (innermost call last, pid 101):",
        "    thread MainThread (main thread, entered collective #8 last):",
        '        File "train.py", line 12, in main',
        "            while True: pass"]


def test_a_rank_heard_of_long_ago_is_not_said_to_be_waited_for_where_the_peers_are_not():
    """A rank frozen before its heartbeat sent again is known only at an old count: the peer two
    collectives further is not 'waiting for it' in the collective after that count."""
    r = reports()
    stale = Reports(r.started, r.ended, r.raised, {0: Beat(9, 99.5, 4, 100), 1: Beat(1, 90.0, None, 101)},
                    {0: {2: B, 9: A}, 1: {1: A}}, {0: {2: 1, 9: 5}, 1: {1: 1}})
    lines = hang_lines(Hang(1, 5.0, 1, 9), stale, {0: "node1", 1: "node2"}, None,
                       {"pid": 101, "state": "T", "state_name": "stopped by a signal"}, 2.0, now=100.0)
    assert lines[0] == "its last collective entered the launcher heard of is #1 'allreduce.grads.a' float64[4]"
    assert lines[3] == "    rank 1 on node2 (pid 101): step ?, collective #1 'allreduce.grads.a' float64[4] (last heard 10 s ago)"


@pytest.mark.parametrize("state, reason", [
    (None, "no stack: neither the rank nor its shim on node2 answered within 2.0 s: the host is down or the "
           "launcher's link to it is cut"),
    ({"pid": 7, "state": "T", "state_name": "stopped by a signal"},
     "no stack: its process (pid 7) is stopped by a signal (state T, e.g. SIGSTOP): a frozen process cannot "
     "report where it is"),
    ({"pid": 7, "state": "R", "state_name": "running", "wchan": "0"},
     "no stack: its process (pid 7) is running (state R) but did not answer within 2.0 s: it holds the Python "
     "GIL (native code that does not release it)"),
])
def test_without_a_stack_the_report_says_why(state, reason):
    assert no_stack_reason(state, "node2", 2.0) == reason
