"""Restart mode with the real example: `python -m launch --max-restarts K` restarts the whole
job after a worker dies or hangs, train_lm resumes from its newest checkpoint, and the result is
the run that was never interrupted (tests/scripts/faulty_train_lm.py injects the fault)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import TINY_LM_MODEL, hang_report

REPO = Path(__file__).resolve().parents[1]
FAULTY = str(REPO / "tests" / "scripts" / "faulty_train_lm.py")
TRAIN_LM = str(REPO / "examples" / "train_lm.py")
# Synchronous checkpoints: the one at step 5 is complete when the fault hits at step 6.
TINY_LM = [*TINY_LM_MODEL, "--warmup", "2", "--log-every", "1", "--checkpoint-every", "5",
           "--sync-checkpoint", "--steps", "12", "--seed", "7"]
# Seconds without progress before a rank is declared hung: a healthy rank of this tiny run beats
# many times a second, and no rank is judged before its first beat (after its imports).
HANG_TIMEOUT = 10
pytestmark = pytest.mark.multiprocess


def launch(launch_args, script, run_dir, fault=None, timeout=280):
    env = dict(os.environ)
    if fault:
        env.update(fault)
    return subprocess.run([sys.executable, "-m", "launch", "-np", "2", *launch_args, script, *TINY_LM,
                           "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def params(run_dir: Path):
    return torch.load(run_dir / "model.pt", weights_only=True)["model_state"]


def logged_steps(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "event" not in r], records


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("restart") / "clean"
    proc = launch([], TRAIN_LM, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return params(run_dir)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["kill", "raise"])
def test_worker_dies_after_a_checkpoint_job_restarts_and_ends_identical(uninterrupted, tmp_path, fault):
    run_dir = tmp_path / "run"
    proc = launch(["--max-restarts", "2"], FAULTY, run_dir, {"FAULT": fault, "FAULT_RANK": "1", "FAULT_STEP": "6"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cause = "killed by SIGKILL" if fault == "kill" else r"exit code 1 \(uncaught RuntimeError: injected failure at step 6\)"
    assert re.search(rf"^distrib-launch: rank 1 on \S+ failed first: {cause}", proc.stderr, re.M), proc.stderr
    assert "distrib-launch: restart 1/2" in proc.stderr and "restart 2/2" not in proc.stderr
    steps, records = logged_steps(run_dir)
    # Attempt 0 logged steps 1-5 (rank 0 may log 6 before the job is stopped); attempt 1 resumed at 5.
    assert steps[:5] == [1, 2, 3, 4, 5] and steps[-7:] == list(range(6, 13)), steps
    assert [r["step"] for r in records if r.get("event") == "resume"] == [5]
    assert {r["restarts"] for r in records if r["step"] > 5 and "event" not in r} >= {1}
    resumed = params(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), f"{name} differs from the uninterrupted run"


@pytest.mark.timeout(600)
def test_restart_budget_exhausted_fails_with_the_root_cause(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(["--max-restarts", "1"], FAULTY, run_dir,
                  {"FAULT": "raise", "FAULT_RANK": "0", "FAULT_STEP": "3", "FAULT_EVERY_ATTEMPT": "1"})
    assert proc.returncode != 0
    assert "distrib-launch: restart 1/1" in proc.stderr
    assert re.search(r"giving up after 1 restarts; root cause: rank 0 on \S+ failed first: exit code 1 "
                     r"\(uncaught RuntimeError: injected failure at step 3\)$", proc.stderr, re.M), proc.stderr[-3000:]
    assert "injected failure at step 3" in proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_the_rank_that_raised_is_blamed_even_when_it_is_killed_before_its_shim_reports(tmp_path, controller):
    """Rank 1 raises, then lingers in finalisation after Horovod's shutdown; rank 0 dies of the
    follow-on HorovodInternalError first, and the launcher kills rank 1 before its shim writes
    how it ended. distrib's exception hook recorded the raise, so rank 1 is still the root cause."""
    proc = launch(["--controller", controller], FAULTY, tmp_path / "run",
                  {"FAULT": "raise", "FAULT_RANK": "1", "FAULT_STEP": "6", "FAULT_SLOW_EXIT": "30"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(r"^distrib-launch: rank 1 on \S+ failed first: exit code 1 \(uncaught RuntimeError: injected "
                     r"failure at step 6\)$", proc.stderr, re.M), proc.stderr[-3000:]
    # and its traceback (from the record) is the one shown under the root cause
    assert re.search(r"^distrib-launch: last \d+ lines of its stderr:\n(    .*\n)*    RuntimeError: injected failure "
                     r"at step 6$", proc.stderr, re.M), proc.stderr[-3000:]


def assert_rank_1_blamed_for_the_hang(stderr):
    """Rank 1 stopped while logging step 6; rank 0 beat once more, before the next collective, in
    which it blocked. (Rank 1's file may hold an earlier count: it is written once a second.)"""
    rank, count, furthest, timeout = hang_report(stderr) or (None,) * 4
    assert (rank, timeout) == (1, HANG_TIMEOUT) and count < furthest, stderr[-3000:]


@pytest.mark.timeout(600)
def test_hung_worker_is_detected_and_the_job_restarts(uninterrupted, tmp_path):
    """SIGSTOP one worker of the real example: with --hang-timeout the launcher declares it hung,
    stops the job and restarts it; the run still ends identical to the uninterrupted one."""
    run_dir = tmp_path / "run"
    proc = launch(["--max-restarts", "1", "--hang-timeout", str(HANG_TIMEOUT)], FAULTY, run_dir,
                  {"FAULT": "stop", "FAULT_RANK": "1", "FAULT_STEP": "6"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_rank_1_blamed_for_the_hang(proc.stderr)
    assert "distrib-launch: restart 1/1" in proc.stderr
    resumed = params(run_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.timeout(600)
def test_hung_worker_without_restarts_fails_naming_the_rank(tmp_path):
    """Without --max-restarts the same hang ends the job: exit 1, the hung rank named, and the
    SIGSTOPped worker does not outlive the launcher."""
    run_dir = tmp_path / "run"
    proc = launch(["--hang-timeout", str(HANG_TIMEOUT)], FAULTY, run_dir,
                  {"FAULT": "stop", "FAULT_RANK": "1", "FAULT_STEP": "6"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert_rank_1_blamed_for_the_hang(proc.stderr)
    assert "distrib-launch: restart 1" not in proc.stderr and "giving up" not in proc.stderr
    left = [p.pid for p in psutil.process_iter(["cmdline", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE
            and str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"workers still running: {left}"
