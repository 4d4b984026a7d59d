"""launch/supervise.py and launch/rank_reports.py with a stand-in for mpirun (tests/scripts/fake_launcher.py) and no Horovod:
first failure, stopping ranks that ignore SIGTERM, hang detection, restarts, interruption."""
import io
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from launch.cli import LaunchConfig
from launch.plan import Plan
from launch.rank_reports import Progress, RankStatus, first_failure, hung_rank, statuses_from, updated_progress
from launch.supervise import supervise
from tests.helpers import SCRIPTS, assert_workers_gone

TOY = str(SCRIPTS / "launch_toy.py")


def status(rank, code, end, signame=None):
    return RankStatus(rank=rank, host="h", pid=1, exit_code=code, signal=signame, end_time=end)


def test_first_failure_is_the_earliest_non_zero():
    statuses = [status(0, 0, 1.0), status(1, 143, 5.0, "SIGTERM"), status(2, 3, 4.0), status(3, 1, 4.5)]
    assert first_failure(statuses).rank == 2
    assert first_failure([status(0, 0, 1.0)]) is None
    assert first_failure([]) is None
    assert status(1, 137, 1.0, "SIGKILL").how == "killed by SIGKILL"
    assert status(1, 3, 1.0).how == "exit code 3"


def test_a_rank_that_failed_because_of_a_peer_is_not_the_root_cause():
    """Rank 1 raised; Horovod shut down and rank 0's allreduce raised, and rank 0 ended first."""
    peer = RankStatus(rank=0, host="h", pid=1, exit_code=1, signal=None, end_time=1.0, stderr_tail=(
        "horovod.common.exceptions.HorovodInternalError: Horovod has been shut down. This was caused by ...",))
    culprit = RankStatus(rank=1, host="h", pid=2, exit_code=1, signal=None, end_time=1.2,
                         stderr_tail=("RuntimeError: injected failure at step 6",))
    assert first_failure([peer, culprit]).rank == 1
    gloo_peer = RankStatus(rank=2, host="h", pid=3, exit_code=1, signal=None, end_time=0.5,
                           stderr_tail=("RuntimeError: [../gloo/transport/tcp/pair.cc:598] Connection closed by peer",))
    assert first_failure([gloo_peer, culprit]).rank == 1
    # --engine torch: a peer of a SIGKILLed rank raises first (its report can arrive first)
    torch_peer = RankStatus(rank=0, host="node1", pid=4, exit_code=1, signal=None, end_time=0.4,
                            exception="RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:"
                                      "537] Read error [198.18.0.2]:10966: Connection reset by peer. This is ...")
    killed = RankStatus(rank=1, host="node2", pid=5, exit_code=137, signal="SIGKILL", end_time=0.6)
    assert first_failure([torch_peer, killed]).rank == 1
    # When every failed rank shows a peer's failure, the earliest still is the answer.
    assert first_failure([peer, gloo_peer]).rank == 2


def test_a_raise_recorded_by_distrib_counts_even_when_the_shim_never_reported_an_end():
    """What mpirun leaves behind when it kills the raising rank's shim mid-finalisation: rank 0's
    follow-on error ended first and has a status; rank 1 has only its raised report."""
    ended = [{"rank": 0, "host": "h", "pid": 10, "exit_code": 1, "end_time": 2.0,
              "stderr_tail": ["HorovodInternalError: Horovod has been shut down."]},
             {"rank": 2, "host": "h"}]  # no exit code, no end time: not a status, skipped
    raised = [{"rank": 0, "host": "h", "pid": 10, "time": 1.9,
               "exception": "HorovodInternalError: Horovod has been shut down."},
              {"rank": 1, "host": "h", "pid": 11, "time": 1.5, "exception": "RuntimeError: injected failure at step 6",
               "traceback_tail": ["Traceback (most recent call last):", "RuntimeError: x"]},
              {"rank": 3, "host": "h"}]  # no time: skipped
    statuses = statuses_from(ended, raised)
    assert [s.rank for s in statuses] == [0, 1]
    culprit = first_failure(statuses)
    assert (culprit.rank, culprit.exit_code, culprit.end_time, culprit.pid) == (1, 1, 1.5, 11)
    assert culprit.how == "exit code 1 (uncaught RuntimeError: injected failure at step 6)"
    assert culprit.stderr_tail == ("Traceback (most recent call last):", "RuntimeError: x")


def test_a_raise_moves_the_rank_to_when_its_failure_began():
    """Both shims reported ends, but rank 1 (which raised first) ended last."""
    ended = [{"rank": 0, "host": "h", "pid": 10, "exit_code": 2, "end_time": 2.0},
             {"rank": 1, "host": "h", "pid": 11, "exit_code": 1, "end_time": 3.0, "stderr_tail": ["shim tail"]}]
    raised = [{"rank": 1, "host": "h", "pid": 11, "time": 1.0, "exception": "ValueError: v"}]
    culprit = first_failure(statuses_from(ended, raised))
    assert (culprit.rank, culprit.end_time, culprit.stderr_tail) == (1, 1.0, ("shim tail",))
    assert culprit.how == "exit code 1 (uncaught ValueError: v)"


def test_a_rank_that_raised_and_was_stopped_while_finalising_failed_by_its_exception():
    """A remote rank still finalising when the job ended is stopped (SIGTERM): the exception is the cause."""
    ended = [{"rank": 1, "host": "node2", "pid": 11, "exit_code": 143, "signal": "SIGTERM", "end_time": 3.0}]
    raised = [{"rank": 1, "host": "node2", "pid": 11, "time": 1.0, "exception": "ValueError: v"}]
    culprit = first_failure(statuses_from(ended, raised))
    assert (culprit.exit_code, culprit.how) == (1, "exit code 1 (uncaught ValueError: v)")


def test_progress_remembers_since_when_each_count_stood_still():
    progress = updated_progress({}, {0: (3, 100.0), 1: (3, 100.0)}, now=10.0)
    progress = updated_progress(progress, {0: (4, 101.0), 1: (3, 101.0)}, now=11.0)
    assert progress == {0: Progress(4, 11.0, 101.0), 1: Progress(3, 10.0, 101.0)}
    assert updated_progress(progress, {}, now=12.0) == progress  # no new beat this time: kept


def test_no_rank_is_hung_before_one_stood_still_for_the_timeout():
    progress = {0: Progress(7, since=0.0, heard=9.0), 1: Progress(6, since=0.0, heard=1.0)}
    assert hung_rank(progress, [], timeout=5.0, now=4.0) is None
    assert hung_rank({}, [], timeout=5.0, now=100.0) is None          # nobody beat yet: not judged
    assert hung_rank(progress, [0, 1], timeout=5.0, now=100.0) is None  # both finished


def test_the_rank_behind_is_blamed_not_the_peer_that_waits_for_it():
    """The CI failure this replaces: rank 1 stopped after its 6th beat, rank 0 blocked in the 7th
    step's allreduce. Rank 0 stood still first (its last count was seen earlier) and its beats arrive
    as recently; the counts still say rank 1 is the cause."""
    progress = {0: Progress(7, since=0.0, heard=50.0), 1: Progress(6, since=0.5, heard=50.0)}
    hang = hung_rank(progress, [], timeout=20.0, now=30.0)
    assert (hang.rank, hang.seconds, hang.count, hang.furthest) == (1, 29.5, 6, 7)
    assert hang.describe(20.0) == ("rank 1 hung: no progress for 30 s at heartbeat 6, "
                                   "the furthest rank is at 7 (--hang-timeout 20)")


def test_among_equal_counts_the_frozen_process_is_blamed_then_the_lowest_rank():
    frozen_1 = {0: Progress(6, 0.0, heard=50.0), 1: Progress(6, 0.0, heard=20.0)}
    assert hung_rank(frozen_1, [], timeout=5.0, now=30.0).rank == 1
    alike = {0: Progress(6, 0.0, 50.0), 1: Progress(6, 0.0, 50.0), 2: Progress(6, 0.0, 50.0)}
    assert hung_rank(alike, [], timeout=5.0, now=30.0).rank == 0


def test_a_finished_rank_is_not_judged():
    progress = {0: Progress(9, 0.0, 1.0), 1: Progress(9, 0.0, 1.0)}
    assert hung_rank(progress, [0], timeout=5.0, now=30.0).rank == 1


def run(tmp_path, *toy_args, np=2, **config):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir(exist_ok=True)
    args = (*toy_args, "--pid-dir", str(pid_dir))
    cfg = LaunchConfig(script=TOY, script_args=args, np=np, hosts=(("localhost", np),), failure_grace=0.5,
                       stop_grace=1.0, **config)
    plan = Plan("fake", "test", (sys.executable, str(SCRIPTS / "fake_launcher.py"), str(np), sys.executable,
                                 "-m", "launch.worker", TOY, *args))
    out = io.StringIO()
    code = supervise(plan, cfg, out=out)
    return code, out.getvalue(), pid_dir


@pytest.mark.timeout(120)
def test_success(tmp_path):
    code, out, pids = run(tmp_path, "--mode", "ok", verbose=True)
    assert code == 0, out
    assert "all ranks finished successfully" in out


@pytest.mark.timeout(120)
def test_first_failure_reported_and_blocked_peer_killed(tmp_path):
    code, out, pids = run(tmp_path, "--mode", "exit3", "--others", "block")
    assert code == 3, out
    lines = out.splitlines()
    assert lines[0].startswith("distrib-launch: rank 1 on ") and lines[0].endswith("failed first: exit code 3")
    assert lines[1] == "distrib-launch: last 20 lines of its stderr:"
    assert lines[2:22] == [f"    rank 1 line {i}" for i in range(10, 30)]
    assert_workers_gone(pids)


@pytest.mark.timeout(120)
def test_signal_death_reported(tmp_path):
    code, out, pids = run(tmp_path, "--mode", "sigkill", "--rank", "0", "--others", "block")
    assert code == 137, out
    assert "rank 0 on" in out and "failed first: killed by SIGKILL" in out
    assert_workers_gone(pids)


@pytest.mark.timeout(120)
def test_sigstopped_rank_is_hung(tmp_path):
    code, out, pids = run(tmp_path, "--mode", "sigstop", "--others", "beat", hang_timeout=3.0)
    assert code == 1, out
    assert f"distrib-launch: rank 1 on {socket.gethostname()} hung: no progress for " in out
    assert "(--hang-timeout 3)" in out
    assert "is stopped by a signal (state T, e.g. SIGSTOP): a frozen process cannot report where it is" in out
    assert "    rank 1 line 29" in out  # the hung rank's last stderr lines
    assert_workers_gone(pids)


@pytest.mark.timeout(180)
def test_restart_after_failure(tmp_path):
    once = tmp_path / "once"
    once.mkdir()
    code, out, pids = run(tmp_path, "--mode", "exit3", "--once-dir", str(once), max_restarts=2)
    assert code == 0, out
    assert "failed first: exit code 3" in out
    assert "distrib-launch: restart 1/2" in out and "restart 2/2" not in out
    assert_workers_gone(pids)


@pytest.mark.timeout(180)
def test_restarts_exhausted(tmp_path):
    code, out, pids = run(tmp_path, "--mode", "exit3", max_restarts=1)
    assert code == 3, out
    first = out.splitlines()[0]
    assert first.startswith("distrib-launch: rank 1 on ") and first.endswith("failed first: exit code 3")
    assert out.splitlines().count(first) == 2
    assert "distrib-launch: restart 1/1" in out
    assert out.splitlines()[-1].startswith("distrib-launch: giving up after 1 restarts; root cause: rank 1 on ")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_everything(tmp_path, signum, expected):
    cancelled = threading.Event()

    def interrupt_once_started():  # Ctrl-C, once both workers run
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pids/*.pid"))) < 2 and time.monotonic() < deadline:
            if cancelled.wait(0.1):
                return
        os.kill(os.getpid(), signum)
    thread = threading.Thread(target=interrupt_once_started)
    thread.start()
    try:
        code, out, pids = run(tmp_path, "--mode", "block", "--others", "beat", max_restarts=3)
    finally:
        cancelled.set()
        thread.join()
    assert code == expected, out
    assert f"distrib-launch: interrupted by {signum.name}: stopped every worker" in out
    assert "restart" not in out
    assert_workers_gone(pids)


def test_missing_launcher_program_is_one_clear_failure(tmp_path):
    cfg = LaunchConfig(script=TOY, script_args=(), np=1, hosts=(("localhost", 1),))
    out = io.StringIO()
    code = supervise(Plan("mpi", "test", (str(tmp_path / "no-mpirun"), "-np", "1")), cfg, out=out)
    assert code == 1
    assert out.getvalue() == f"distrib-launch: cannot start {tmp_path / 'no-mpirun'}: No such file or directory; " \
                             f"install it or put it on PATH\n"
