"""The headline test: SIGKILL every worker at random moments, resume, end bit-identical.

A tiny char-GPT run (2 Horovod workers, async checkpoint every 4 steps, dropout, shuffled
sharded data, AdamW, LR schedule) is killed at >= 10 moments: half at a random moment (a
random number of steps, then a random delay), half while a checkpoint is being written
(DISTRIB_TEST_SLOW_WRITE_S widens the write; the kill follows the appearance of its temporary
folder). Each time it resumes with --resume auto. At the end every rank's parameters, the
replicated "extra" state and every rank's RNG state must equal (torch.equal) those of a run
that was never interrupted. KILL_TEST_SEED=N replays one sequence of kill moments.
"""
import os
import random
import re
import subprocess
import time

import numpy as np
import pytest
import torch

from distrib.checkpoint import store
from tests.checkpoint_fixtures import REPO, SCRIPTS, hvd_command, kill_tree

SCRIPT = SCRIPTS / "ckpt_train.py"
STEPS, EVERY, KILLS = 136, 4, 10


def start(run_dir, out, log, slow):
    env = {**os.environ, "DISTRIB_TEST_SLOW_WRITE_S": str(slow)}
    cmd = hvd_command(2, SCRIPT, ["--run-dir", run_dir, "--out", out, "--steps", STEPS, "--every", EVERY])
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(predicate, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"nothing happened in {timeout} s")


def temp_folders(root):
    return {p.name for p in root.iterdir() if p.name.startswith(store.TMP_PREFIX + "step-")} if root.is_dir() else set()


def steps_logged(log):
    """Step lines rank 0 printed, whatever prefix the launcher puts before them."""
    return len(re.findall(r"step \d+$", log.read_text(), flags=re.M))


def assert_same_final(a, b):
    assert a["step"] == b["step"] == STEPS
    for ra, rb in zip(a["ranks"], b["ranks"]):
        assert ra["rank"] == rb["rank"]
        for k in ra["params"]:
            assert torch.equal(ra["params"][k], rb["params"][k]), f"rank {ra['rank']} {k} differs"
        assert ra["noise"] == rb["noise"], "the 'extra' state (python/numpy draws) differs"
        assert ra["rng"]["python"] == rb["rng"]["python"]
        assert all(np.array_equal(x, y) for x, y in zip(ra["rng"]["numpy"], rb["rng"]["numpy"]))
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    seed = int(os.environ.get("KILL_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    ref_out, out = tmp_path / "reference.pt", tmp_path / "final.pt"
    # The uninterrupted run goes alongside the first attempts (its numbers do not depend on timing).
    reference = start(tmp_path / "ref", ref_out, tmp_path / "reference.log", slow=0)

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    kills, mid_write, history = 0, 0, []
    try:
        for attempt in range(1, 40):
            if kills >= KILLS:
                break
            log = tmp_path / f"attempt-{attempt}.log"
            leftovers = temp_folders(root)  # from the previous kill; removed at the next save
            proc = start(run_dir, out, log, slow=0.1)
            try:
                before = steps_logged(log)
                wait_for(lambda: steps_logged(log) > before, proc, 180)  # it resumed and trains
                if attempt % 2:
                    # a random number of steps, then a random delay: bounded progress per attempt,
                    # so that the run cannot finish before the 10th kill on a fast machine
                    steps, moment = rng.randint(1, 10), rng.uniform(0.0, 0.15)
                    wait_for(lambda: steps_logged(log) >= before + steps, proc, 180)
                    time.sleep(moment)
                    what = f"random: {moment:.2f}s after {steps} steps"
                else:
                    nth, moment = rng.randint(1, 2), rng.uniform(0.0, 0.25)
                    for _ in range(nth):  # the first or the second write after the resume
                        seen = temp_folders(root)
                        wait_for(lambda: temp_folders(root) - seen, proc, 60)
                    time.sleep(moment)
                    what = f"{moment:.2f}s into checkpoint write #{nth}"
                if proc.poll() is not None:
                    history.append(f"attempt {attempt}: finished before the kill ({what})")
                    assert proc.returncode == 0, log.read_text()[-3000:]
                    break
                kill_tree(proc.pid)
                proc.wait()
            finally:
                kill_tree(proc.pid)
            kills += 1
            in_write = bool(temp_folders(root) - leftovers)
            mid_write += in_write
            history.append(f"attempt {attempt}: killed {what} after {steps_logged(log)} steps logged"
                           f"{' (a write was in progress)' if in_write else ''}; "
                           f"checkpoints {[p.name for p in sorted(root.iterdir())] if root.is_dir() else []}")
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
            for step_dir in (p for p in (root.iterdir() if root.is_dir() else ()) if store.step_of(p) is not None):
                store.validate(step_dir)  # a kill never leaves a committed but broken checkpoint
        report = f"seed {seed}\n" + "\n".join(history)
        assert kills >= KILLS, report
        assert mid_write >= 3, report

        final_log = tmp_path / "final.log"
        proc = start(run_dir, out, final_log, slow=0)
        assert proc.wait(timeout=300) == 0, report + "\n" + final_log.read_text()[-3000:]
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        kill_tree(reference.pid)
    print(report)  # the seed, to replay a failure, and where each kill fell
    assert_same_final(torch.load(out, weights_only=False), torch.load(ref_out, weights_only=False))
