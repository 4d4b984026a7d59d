"""CheckpointManager across real Horovod workers (project launcher, Gloo): per-rank RNG, rank 0's
choice obeyed by every rank, errors raised on every rank, resume on other world sizes."""
import pytest

from tests.checkpoint_fixtures import SCRIPTS, run_hvd

SCRIPT = SCRIPTS / "ckpt_roundtrip.py"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_ranks_save_restore_and_resume_on_other_world_sizes(tmp_path):
    common = ["--run-dir", tmp_path / "run", "--out", tmp_path / "out"]
    saved = run_hvd(2, SCRIPT, ["--phase", "save", *common])
    assert "OK rank 0 of 2" in saved.stdout and "OK rank 1 of 2" in saved.stdout
    damaged = [line for line in saved.stdout.splitlines() + saved.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "step-00000002" in damaged[0]  # rank 0 warns once; rank 1 follows silently
    # fewer workers: rank 0 takes rank 0's RNG state
    assert "OK rank 0 of 1" in run_hvd(1, SCRIPT, ["--phase", "resume", *common]).stdout
    # more workers: ranks 0 and 1 take theirs, rank 2 gets one derived from the seed
    more = run_hvd(3, SCRIPT, ["--phase", "resume", *common])
    assert all(f"OK rank {r} of 3" in more.stdout for r in range(3))
