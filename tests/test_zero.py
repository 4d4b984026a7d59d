"""ZeRO stages 1 and 2 (distrib.wrap(..., shard=...)) with real Horovod workers: the same numbers
as single-process torch, and checkpoints that reshard (2 -> 3 -> 1 workers, sharded -> unsharded).

Three launches per engine plan (tests/scripts/zero_train.py). The first, on 2 workers, trains every math
case (AdamW with two param groups and weight decay; accumulation with clipping by the global norm;
SGD with momentum) with shard="optimizer", shard="gradients" and unsharded, float64, ~400-byte
buckets so that parameters straddle ranks; then it starts the run that is resumed on 3 workers,
then on 1 without sharding. The plans: every launch on Horovod; and torch -> Horovod -> torch, so
a checkpoint written under one engine is resumed under the other, at another world size.
"""
import importlib.util

import pytest
import torch

from distrib.checkpoint import store
from distrib.checkpoint.sharded import consolidate, shard_file
from tests.helpers import SCRIPTS, run_launch, run_torchrun

SCRIPT = SCRIPTS / "zero_train.py"
_spec = importlib.util.spec_from_file_location("zero_train", SCRIPT)
zero_train = importlib.util.module_from_spec(_spec)  # the plain torch reference, computed here too
_spec.loader.exec_module(zero_train)


def launch(engine, np_, *args):
    if engine == "torch":
        run_torchrun(np_, SCRIPT, [str(a) for a in args], timeout=300)
    else:
        run_launch(["-np", str(np_), "--controller", "gloo"], SCRIPT, [str(a) for a in args], timeout=300)


def assert_close(a, b, what):
    assert a.keys() == b.keys()
    for key in a:  # float64: reduction-order noise only
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=f"{what}: {key}")


def check_math(results):
    assert results["size"] == 2 and len(results["cases"]) == len(zero_train.MATH_CASES)
    for case in results["cases"]:
        name = "{} accumulate={} max_grad_norm={}".format(*case["case"])
        plain = case["plain"]
        assert any(not torch.equal(plain[k], case["initial"][k]) for k in plain), f"{name}: nothing trained"
        for shard in ("optimizer", "gradients", "none"):
            ranks = case["sharded"][shard]["ranks"]
            assert_close(ranks[0], plain, f"{name}, shard={shard}")
            # every rank holds the whole, identical model (rank 1 started from other weights)
            assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in plain), f"{name}, shard={shard}"
        full = case["sharded"]["none"]["state_bytes"][0]
        for shard in ("optimizer", "gradients"):
            per_rank = case["sharded"][shard]["state_bytes"]
            # each rank keeps about half the moments (plus one step counter per piece)
            assert max(per_rank) < 0.55 * full and sum(per_rank) >= full, (name, shard, per_rank, full)
        if case["case"][2] is not None:  # the global norm, from the shards' partial sums
            assert case["sharded"]["gradients"]["norm"] == pytest.approx(case["sharded"]["none"]["norm"], rel=1e-12)


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
@pytest.mark.parametrize("engines", [("horovod", "horovod", "horovod"), ("torch", "horovod", "torch")],
                         ids=["horovod", "torch-horovod-torch"])
def test_sharded_math_equals_torch_and_resume_on_3_then_1_workers_reshards(tmp_path, engines):
    run = tmp_path / "run"
    common = ["--run-dir", run, "--every", 2, "--total", 12]
    launch(engines[0], 2, *common, "--math-out", tmp_path / "math.pt", "--shard", "gradients", "--stop-at", 4,
           "--out", tmp_path / "a.pt", "--sync")
    math = torch.load(tmp_path / "math.pt", weights_only=False)
    assert math["engine"] == engines[0]
    check_math(math)

    launch(engines[1], 3, *common, "--shard", "optimizer", "--stop-at", 8, "--out", tmp_path / "b.pt")
    root = run / "checkpoints"
    assert sorted(p.name for p in (root / store.step_dirname(8)).iterdir()) == sorted(
        [store.MARKER, store.STATE_FILE, store.RNG_FILE] + [shard_file(r) for r in range(3)])
    # the 3 shards of step 8 (re-cut from 2 at step 4), consolidated, are torch's state after 8 steps
    _, plain_opt = zero_train.plain("adamw", 8, 0.05, total=12)
    saved = consolidate(root / store.step_dirname(8))["state"]["optimizer"]
    assert saved["state"].keys() == plain_opt["state"].keys()
    for index, moments in plain_opt["state"].items():
        assert_close(saved["state"][index], moments, f"step 8, parameter {index}")

    launch(engines[2], 1, *common, "--shard", "none", "--out", tmp_path / "c.pt")  # unsharded, from the shards
    final = torch.load(tmp_path / "c.pt", weights_only=False)
    assert final["step"] == 12 and final["size"] == 1 and final["engine"] == engines[2]
    assert_close(final["ranks"][0], final["plain"], "after 2 -> 3 -> 1 workers")
