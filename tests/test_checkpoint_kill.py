"""The headline test: SIGKILL every worker at random moments, resume, end bit-identical.

A tiny char-GPT run (2 Horovod workers, async checkpoint every 4 steps, dropout, shuffled
sharded data, AdamW, LR schedule) is killed 4 times, each kind of moment twice: at a random
moment of training (a random number of steps, then a random delay) and while a checkpoint is
being written (DISTRIB_TEST_SLOW_WRITE_S widens the write; the kill follows the appearance of its
temporary folder by a random delay), once in the first write after a resume and once in the
second, when training went on beside the first. At least two kills must land mid-write; the
first kill falls after the first checkpoint was committed. Each time it resumes with --resume
auto, and must resume from the newest checkpoint committed before the kill (not start over) with
the parameters the uninterrupted run had at that step (not those of a later step, as a snapshot
that shared the live tensors would hold). At the end every rank's parameters, the replicated
"extra" state and every rank's RNG state must equal (torch.equal) those of a run that was never
interrupted. KILL_TEST_SEED=N replays one sequence of kill moments.
"""
import os
import random
import re
import time

import numpy as np
import pytest
import torch

from distrib.checkpoint import store
from tests.checkpoint_fixtures import (SCRIPTS, kill_tree, start_job, steps_logged, temp_folders, validate_committed,
                                       wait_for)

SCRIPT = SCRIPTS / "ckpt_train.py"
# At most ~10 steps per attempt before its kill: 64 steps cannot finish before the 4th kill.
STEPS, EVERY = 64, 4
# (kind, nth write after the resume): each kind of moment twice, every phase of a write once.
KILLS = [("random", 0), ("write", 1), ("random", 0), ("write", 2)]


def start(run_dir, out, log, slow):
    return start_job(SCRIPT, ["--run-dir", run_dir, "--out", out, "--steps", STEPS, "--every", EVERY], log, slow)


def committed_steps(root) -> list:
    return sorted(store.step_of(p) for p in root.iterdir() if store.step_of(p) is not None) if root.is_dir() else []


def resumed_from(log) -> tuple:
    """(step, parameter digest) the script printed after its restore."""
    found = re.search(r"resumed from (\d+) params (\w+)$", log.read_text(), flags=re.M)
    assert found, f"{log.name}: no 'resumed from' line\n" + log.read_text()[-3000:]
    return int(found.group(1)), found.group(2)


def digests_by_step(log) -> dict:
    """{step: parameter digest} of a run, at each checkpoint step (and at its start)."""
    start, at_start = resumed_from(log)
    steps = {int(n): d for n, d in re.findall(r"params (\d+) (\w+)$", log.read_text(), flags=re.M)}
    return {start: at_start, **steps}


def assert_resumed_where_the_run_was(attempts, reference_log):
    """Each attempt after a kill started from the newest checkpoint committed before it, after
    step 0, holding the parameters the uninterrupted run had at that step."""
    reference = digests_by_step(reference_log)
    for attempt, (log, committed) in enumerate(attempts, start=1):
        step, digest = resumed_from(log)
        assert step == committed, f"attempt {attempt} resumed from step {step}, the newest checkpoint was {committed}"
        if attempt > 1:
            assert step > 0, f"attempt {attempt} started over at step 0"
        assert digest == reference[step], (f"attempt {attempt} resumed at step {step} with other parameters than the "
                                           f"uninterrupted run had at step {step}")


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
    attempts = []  # (log, the newest committed checkpoint's step when it started)
    try:
        for attempt, (kind, nth) in enumerate(KILLS, start=1):
            log = tmp_path / f"attempt-{attempt}.log"
            leftovers = temp_folders(root)  # from the previous kill; removed at the next save
            attempts.append((log, max(committed_steps(root), default=0)))
            proc = start(run_dir, out, log, slow=0.1)
            try:
                before = steps_logged(log)
                wait_for(lambda: steps_logged(log) > before, proc, 180)  # it resumed and trains
                if kind == "random":
                    if attempt == 1:  # every later attempt must resume from a checkpoint, not start over
                        wait_for(lambda: committed_steps(root), proc, 180)
                        before = steps_logged(log)
                    # a random number of steps, then a random delay: bounded progress per attempt,
                    # so that the run cannot finish before the last kill on a fast machine
                    steps, moment = rng.randint(1, 10), rng.uniform(0.0, 0.15)
                    wait_for(lambda: steps_logged(log) >= before + steps, proc, 180)
                    time.sleep(moment)
                    what = f"random: {moment:.2f}s after {steps} steps"
                else:
                    moment = rng.uniform(0.0, 0.25)  # a write of several files takes >= 0.1 s each
                    for _ in range(nth):  # the first or the second write after the resume
                        seen = temp_folders(root)
                        wait_for(lambda: temp_folders(root) - seen, proc, 60)
                    time.sleep(moment)
                    what = f"{moment:.2f}s into checkpoint write #{nth}"
                assert proc.poll() is None, (f"seed {seed}: attempt {attempt} finished before its kill ({what})\n"
                                             + log.read_text()[-3000:])
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
            validate_committed(root)  # a kill never leaves a committed but broken checkpoint
        report = f"seed {seed}\n" + "\n".join(history)
        assert kills == len(KILLS), report
        assert mid_write >= 2, report

        final_log = tmp_path / "final.log"
        attempts.append((final_log, max(committed_steps(root), default=0)))
        proc = start(run_dir, out, final_log, slow=0)
        assert proc.wait(timeout=300) == 0, report + "\n" + final_log.read_text()[-3000:]
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        kill_tree(reference.pid)
    print(report)  # the seed, to replay a failure, and where each kill fell
    assert_resumed_where_the_run_was(attempts, tmp_path / "reference.log")
    assert_same_final(torch.load(out, weights_only=False), torch.load(ref_out, weights_only=False))
