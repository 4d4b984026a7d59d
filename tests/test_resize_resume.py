"""Resuming on a different number of workers, with real checkpoints and real Horovod jobs: the
epoch goes on from its first unconsumed sample (none skipped, none seen twice) and the learning
rate follows the new world size. (The script's --log flag, an abbreviation of horovodrun's
--log-level, also checks that script flags reach the script under the Gloo controller.)"""
import json

import pytest

from distrib.job.schedule import lr_factor, scaled_lr
from tests.checkpoint_fixtures import SCRIPTS, run_hvd

SCRIPT = SCRIPTS / "resize_train.py"
SAMPLES, BATCH = 88, 4         # 88 = 5 steps x 8 (2 workers) + 4 x 12 (3 workers) = 5 x 8 + 12 x 4 (1 worker)
BASE_LR, TOTAL_STEPS, WARMUP = 0.01, 40, 3  # as in the script


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("new_size", [3, 1])
def test_resume_mid_epoch_on_another_world_size_consumes_each_sample_once(tmp_path, new_size):
    log = tmp_path / "steps.jsonl"
    common = ["--run-dir", tmp_path / "run", "--log", log, "--samples", SAMPLES, "--batch-size", BATCH]
    run_hvd(2, SCRIPT, [*common, "--steps", 11, "--stop-at", 5])
    end = 5 + (SAMPLES - 5 * 2 * BATCH) // (new_size * BATCH)  # the rest of the epoch on new_size workers
    run_hvd(new_size, SCRIPT, [*common, "--steps", end])

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, end + 1))
    assert [r["size"] for r in records] == [2] * 5 + [new_size] * (end - 5)
    seen = [i for r in records for rank_indices in r["indices"] for i in rank_indices]
    assert sorted(seen) == list(range(SAMPLES)), "a sample of the epoch was skipped or seen twice"
    assert all(len(rank_indices) == BATCH for r in records for rank_indices in r["indices"])
    for r in records:  # the lr of step n is set after n-1 schedule steps, for that step's world size
        expected = scaled_lr(BASE_LR, r["size"]) * lr_factor(r["step"] - 1, WARMUP, TOTAL_STEPS)
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r
