"""SIGKILL a sharded run (shard="gradients", 2 workers, async checkpoints: every rank writes its
shard) at a random moment while a checkpoint is being written and training goes on beside it,
resume with --resume auto: the final parameters of every rank equal (torch.equal) those of a run
that was never interrupted. The cheap sibling of tests/test_checkpoint_kill.py (one kill, not
four); ZERO_KILL_SEED=N replays one kill moment.
"""
import os
import random
import re
import time

import pytest
import torch

from tests.checkpoint_fixtures import (SCRIPTS, kill_tree, start_job, steps_logged, temp_folders, validate_committed,
                                       wait_for)

SCRIPT = SCRIPTS / "zero_train.py"
STEPS, EVERY = 24, 2


def start(run_dir, out, log, slow):
    return start_job(SCRIPT, ["--shard", "gradients", "--run-dir", run_dir, "--out", out, "--total", STEPS,
                              "--every", EVERY, "--step-sleep", 0.05], log, slow)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_sigkill_a_sharded_run_then_resume_is_bit_identical(tmp_path):
    seed = int(os.environ.get("ZERO_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    ref_out, out = tmp_path / "reference.pt", tmp_path / "final.pt"
    reference = start(tmp_path / "ref", ref_out, tmp_path / "reference.log", slow=0)
    root = tmp_path / "run" / "checkpoints"
    try:
        log = tmp_path / "killed.log"
        proc = start(tmp_path / "run", out, log, slow=0.1)
        try:
            steps = rng.randint(3, 7)
            wait_for(lambda: steps_logged(log) >= steps, proc, 180)
            seen = temp_folders(root)
            wait_for(lambda: temp_folders(root) - seen, proc, 60)  # the next write has begun
            moment = rng.uniform(0.0, 0.15)
            time.sleep(moment)
            assert proc.poll() is None, f"seed {seed}: the run finished before its kill"
            in_write = bool(temp_folders(root))
            kill_tree(proc.pid)
            proc.wait()
        finally:
            kill_tree(proc.pid)
        history = f"killed {moment:.2f} s into a write at {steps_logged(log)} steps logged (in write: {in_write})"
        assert in_write, f"seed {seed}: {history}"
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        # a kill never leaves a committed but broken checkpoint
        assert validate_committed(root), f"seed {seed}: nothing to resume from; {history}"
        final = start(tmp_path / "run", out, tmp_path / "final.log", slow=0)
        assert final.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
        first = re.search(r"step (\d+)$", (tmp_path / "final.log").read_text(), flags=re.M)
        assert first and int(first.group(1)) > 1, f"seed {seed}: the last run did not resume; {history}"
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        kill_tree(reference.pid)
    print(f"seed {seed}: {history}")
    got, want = torch.load(out, weights_only=False), torch.load(ref_out, weights_only=False)
    assert got["step"] == want["step"] == STEPS
    for rank in range(2):
        for key, value in want["ranks"][rank].items():
            assert torch.equal(got["ranks"][rank][key], value), f"seed {seed}: rank {rank} {key} differs"
