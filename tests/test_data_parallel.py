"""The defining property of synchronous data parallelism, with real workers and real Horovod.

N workers with per-worker batch b must produce the same parameters after k steps as one
worker with batch N*b on the same data, under both Horovod controllers.
"""
import pytest
import torch

from tests.helpers import SCRIPTS, run_launch

SCRIPT = SCRIPTS / "equivalence.py"


def train(tmp_path, name, np_, controller, batch_size, *extra):
    out = tmp_path / f"{name}.pt"
    run_launch(["-np", str(np_), "--controller", controller], SCRIPT,
               ["--batch-size", batch_size, "--out", out, *extra])
    return torch.load(out)


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-10, msg=key)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_two_workers_match_one_worker_with_double_batch(tmp_path, controller):
    one = train(tmp_path, "one", 1, controller, 16)
    two = train(tmp_path, "two", 2, controller, 8)
    assert two["size"] == 2 and one["size"] == 1
    assert_same_params(one["params"], two["params"])
    # every rank holds the same parameters: rank 1 started from a different init
    assert_same_params(two["all_ranks"][0], two["all_ranks"][1])
    # and training moved them: a run of zero steps differs
    zero = train(tmp_path, "zero", 1, controller, 16, "--steps", "0")
    assert any(not torch.equal(zero["params"][k], one["params"][k]) for k in one["params"])


@pytest.mark.timeout(300)
def test_accumulation_and_clipping_match_one_big_batch(tmp_path):
    # 2 workers x 2 micro-batches of 4 == 1 worker x 16, with Adam and clipping after averaging
    one = train(tmp_path, "one", 1, "gloo", 16, "--optimizer", "adam", "--max-grad-norm", "0.05")
    two = train(tmp_path, "acc", 2, "gloo", 4, "--accumulate", "2", "--optimizer", "adam", "--max-grad-norm", "0.05")
    assert_same_params(one["params"], two["params"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_wrapped_workers_match_the_plain_single_process_script(tmp_path, optimizer):
    """Against plain torch, not distrib on one worker: wrapping must not change the training
    (Horovod's broadcast_optimizer_state steps a fresh optimizer once, which AdamW's weight
    decay and Adam's step count would show)."""
    plain = train(tmp_path, "plain", 1, "mpi", 16, "--optimizer", optimizer, "--plain")
    two = train(tmp_path, "two", 2, "mpi", 8, "--optimizer", optimizer)
    assert_same_params(plain["params"], two["params"])
    # right after wrap, before any step: rank 0's initial weights, untouched, on every rank
    plain0 = train(tmp_path, "plain0", 1, "mpi", 16, "--optimizer", optimizer, "--plain", "--steps", "0")
    two0 = train(tmp_path, "two0", 2, "mpi", 8, "--optimizer", optimizer, "--steps", "0")
    for rank_params in two0["all_ranks"]:
        assert all(torch.equal(plain0["params"][k], rank_params[k]) for k in plain0["params"])
