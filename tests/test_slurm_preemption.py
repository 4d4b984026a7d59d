"""distrib/job/preemption.py in one process: signals, cross-rank agreement, requeue policy."""
import os
import signal
import subprocess
from types import SimpleNamespace

import pytest

from distrib.job.preemption import PreemptionHandler, requeue_target

RANK0 = SimpleNamespace(rank=0, size=2)
RANK1 = SimpleNamespace(rank=1, size=2)
SLURM = {"SLURM_JOB_ID": "42"}


class FakeRun:
    def __init__(self, returncode=0):
        self.calls, self.returncode = [], returncode

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "boom" if self.returncode else "")


def handler(env=SLURM, others=(0, 0), run=None, **kw):
    """A handler whose 'other rank' contributes ``others`` to each allreduce."""
    def allreduce_sum(values):
        return [v + (others[i] if len(values) == 2 else 1) for i, v in enumerate(values)]
    return PreemptionHandler(env=env, run=run or FakeRun(), allreduce_sum=allreduce_sum, **kw)


def test_usr2_sets_flag_then_requeues_on_rank0():
    run = FakeRun()
    h = handler(run=run)
    try:
        assert not h.should_stop(RANK0)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert h.signal_received and h.should_stop(RANK0) and h.decision == "requeue"
        assert h.should_stop(RANK0)  # stays decided
        assert h.requeue(RANK0) is True
        assert run.calls == [["scontrol", "requeue", "42"]]
    finally:
        h.close()


def test_ranks_agree_when_only_another_rank_got_the_signal():
    run = FakeRun()
    h = handler(others=(1, 0), run=run)
    assert h.should_stop(RANK1) and h.decision == "requeue"
    assert h.requeue(RANK1) is False and run.calls == []  # only rank 0 calls scontrol
    h.close()


def test_sigterm_anywhere_stops_without_requeue():
    run = FakeRun()
    h = handler(others=(1, 1), run=run)
    assert h.should_stop(RANK0) and h.decision == "terminate"
    assert h.requeue(RANK0) is False and run.calls == []


def test_check_every_skips_collectives():
    calls = []
    h = PreemptionHandler(env=SLURM, run=FakeRun(), check_every=3,
                          allreduce_sum=lambda v: calls.append(v) or [1, 0])
    assert [h.should_stop(RANK0) for _ in range(3)] == [False, False, True]
    assert len(calls) == 1
    h.close()


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "20"}, False),           # default budget 20 spent
    ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1", "DISTRIB_MAX_REQUEUES": "1"}, False),
    ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "19"}, True),
    ({}, False),                                                              # not in Slurm
])
def test_requeue_budget(env, expected):
    run = FakeRun()
    h = handler(env=env, others=(1, 0), run=run)
    assert h.should_stop(RANK0)
    assert h.requeue(RANK0) is expected
    assert bool(run.calls) is expected


def test_failed_scontrol_is_reported_not_raised(capsys):
    h = handler(others=(1, 0), run=FakeRun(returncode=1))
    assert h.should_stop(RANK0) and h.requeue(RANK0) is False
    assert "scontrol requeue 42" in capsys.readouterr().err


def test_array_job_target():
    assert requeue_target({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "129", "SLURM_ARRAY_TASK_ID": "1"}) == "129_1"
    assert requeue_target({"SLURM_JOB_ID": "130"}) == "130" and requeue_target({}) is None


def test_close_restores_previous_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    with handler() as h:
        assert signal.getsignal(signal.SIGUSR2) == h._on_signal
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("env, kw, message", [
    ({"DISTRIB_MAX_REQUEUES": "many"}, {}, "DISTRIB_MAX_REQUEUES"),
    ({}, {"check_every": 0}, "check_every"),
])
def test_bad_configuration(env, kw, message):
    with pytest.raises(ValueError, match=message):
        PreemptionHandler(env=env, **kw)


def test_single_process_needs_no_collective():
    h = PreemptionHandler(env=SLURM, run=FakeRun(), allreduce_sum=lambda v: pytest.fail("no collective"))
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        one = SimpleNamespace(rank=0, size=1)
        assert h.should_stop(one) and h.requeue(one)
    finally:
        h.close()
