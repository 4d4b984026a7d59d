"""On a GPU the training step must never make the host wait for the device.

CI has no GPU, so this counts what would: a host read of a tensor's value (``.item()``,
``float()``, ``bool()``, ``.tolist()``) or a host value written into a tensor by a blocking copy,
during ``backward()`` + ``step()`` of the wrapped optimizer (tests/scripts/sync_counter.py).
Two real workers, every precision and shard mode, clipping on, against the same loop in plain
torch. scripts/gpu_check.py runs the same script on a GPU under
``torch.cuda.set_sync_debug_mode("error")``.
"""
import json

import pytest
import torch

from tests.helpers import SCRIPTS, run_launch, run_torchrun
from tests.scripts.sync_counter import SyncCounter

_runs = {}


def counts(tmp_path_factory, engine="horovod"):
    if engine not in _runs:
        out = tmp_path_factory.mktemp("syncs") / "syncs.json"
        if engine == "torch":
            run_torchrun(2, SCRIPTS / "step_syncs.py", ["--out", out], timeout=240)
        else:
            run_launch(["-np", "2"], SCRIPTS / "step_syncs.py", ["--out", out], timeout=240)
        _runs[engine] = json.loads(out.read_text())
        assert {r["engine"] for r in _runs[engine]} == {engine}
    return _runs[engine]


def test_the_counter_sees_what_would_wait_for_a_gpu_and_nothing_else():
    t = torch.zeros(4)
    with SyncCounter().counting() as c:
        t[0].item()
        float(t[1])
        bool(t[2] > 0)
        t.tolist()
        t[3] = 1.0
    assert len(c.calls) == 5, c.calls
    assert all("test_step_syncs.py" in call for call in c.calls), c.calls
    with SyncCounter().counting() as c:
        t[:2].copy_(torch.tensor([1.0, 0.0]), non_blocking=True)  # staged, the host does not wait
        t[2:].fill_(2.0)                                          # a kernel argument, no copy
        torch.nn.utils.clip_grad_norm_([torch.ones(3, requires_grad=True)], 1.0)
    assert c.calls == []


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("shard", ["none", "optimizer", "gradients"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_backward_and_step_never_wait_for_the_device(engine, precision, shard, tmp_path_factory):
    ranks = counts(tmp_path_factory, engine)
    assert [r["size"] for r in ranks] == [2, 2]
    for rank, result in enumerate(ranks):
        plain = result["cases"][f"plain-{precision}"]
        got = result["cases"][f"distrib-{precision}-{shard}"]
        # fp32 and bf16: plain torch (SGD, clip_grad_norm_) reads nothing, so neither may we;
        # fp16: GradScaler.step reads its inf flag once per step, in plain torch as in ours
        assert plain["per_step"] == ([1] * 3 if precision == "fp16" else [0] * 3), plain
        assert got["per_step"] == plain["per_step"], (
            f"rank {rank}, precision={precision}, shard={shard}: {got['per_step']} host waits per step, plain "
            f"torch {plain['per_step']}; extra: {sorted(set(got['calls']) - set(plain['calls']))}")
        assert got["norm_is_tensor"], "last_grad_norm was read on the host"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_parameter_unused_on_one_rank_costs_that_rank_one_read(tmp_path_factory):
    ranks = counts(tmp_path_factory)
    assert ranks[0]["cases"]["distrib-fp32-none-unused-on-rank-1"]["per_step"] == [0, 0, 0]
    # rank 1 must learn whether rank 0 used the head (it did): one small read of the averaged flags
    assert ranks[1]["cases"]["distrib-fp32-none-unused-on-rank-1"]["per_step"] == [1, 1, 1]
