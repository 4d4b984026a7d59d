"""The reducers' own logic: bucket assignment (pure), and, with real workers, that the
bucketed reducers average exactly what the per-parameter reducer averages."""
import pytest
import torch

from distrib.comm import LocalComm
from distrib.step.reducers import BucketedReducer, assign_buckets, bucket_offsets, make_reducer
from tests.helpers import SCRIPTS, run_launch

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("nbytes,dtypes,cap,expected", [
    ([4, 4, 4], [F32] * 3, 100, [[2, 1, 0]]),                 # everything fits: one bucket, reversed
    ([4, 4, 4, 4], [F32] * 4, 8, [[3, 2], [1, 0]]),           # closed when reaching the cap
    ([4, 100, 4, 100], [F32] * 4, 50, [[3], [2, 1], [0]]),    # big params close their bucket
    ([4, 4, 4], [F32, F64, F32], 100, [[2, 0], [1]]),         # one dtype per bucket
    ([8, 8, 8], [F32, F64, F32], 8, [[2], [1], [0]]),
    ([], [], 8, []),
])
def test_assign_buckets(nbytes, dtypes, cap, expected):
    assert assign_buckets(nbytes, dtypes, cap) == expected


def test_a_first_cap_closes_only_the_first_bucket_early():
    """DDP's small first bucket (the torch engine's first_bucket_mb): the last layers' gradients
    leave as soon as they hold the first cap; the later buckets fill to the usual cap."""
    sizes = [4] * 10
    assert assign_buckets(sizes, [F32] * 10, 16, first_cap_bytes=8) == [[9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]
    assert assign_buckets(sizes, [F32] * 10, 16) == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]]


def test_the_engine_sets_the_first_buckets_cap():
    """The torch engine asks for DDP's 1 MiB first bucket when the world spans hosts, none on one
    host; make_reducer builds what the comm asks for."""
    from types import SimpleNamespace

    from distrib.comm.local import LocalComm
    from distrib.comm.torch_dist import TorchComm

    assert TorchComm.first_bucket_mb.fget(SimpleNamespace(cross_size=2)) == 1.0
    assert TorchComm.first_bucket_mb.fget(SimpleNamespace(cross_size=1)) is None
    assert LocalComm.first_bucket_mb is None

    class SmallFirstBucket(LocalComm):
        first_bucket_mb = 1.0

    params = [(f"p{i}", torch.zeros(2**17)) for i in range(4)]  # 0.5 MiB each, float32
    assert [len(b) for b in make_reducer(params, SmallFirstBucket(), bucket_mb=4).buckets] == [2, 2]
    assert [len(b) for b in make_reducer(params, LocalComm(), bucket_mb=4).buckets] == [4]


class SummingPair(LocalComm):
    """A world of two whose average would be a sum then a division (Gloo's case): it records the
    op and what each bucket held when it was sent, and sums with an identical peer."""
    divides_average = True

    def __init__(self):
        super().__init__()
        self.sent = []

    size = property(lambda self: 2)

    def _allreduce_async_(self, tensor, name, op):
        self.sent.append((op, tensor.clone()))
        tensor.mul_(2 if op == "sum" else 1)  # the peer sent the same: sum = 2x, average = 1x
        return super()._allreduce_async_(tensor, name, "sum")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_prescale_divides_on_the_way_into_the_bucket_and_sends_a_sum(set_to_none):
    """Gloo has no average: the reducer divides while copying into the bucket and asks for the
    sum (DDP's way), instead of a sum and a second pass of division; with zero_grad(set_to_none=
    False) the gradient already is the bucket's view and is divided in place."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    comm = SummingPair()
    red = make_reducer(list(model.named_parameters()), comm, bucket_mb=1)
    for step in range(2):
        if set_to_none:
            model.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        model(torch.ones(4, 3)).sum().backward()
        expected = [p.grad.clone() for p in model.parameters()]
        for p in reversed(list(model.parameters())):
            red.grad_ready(p)
        assert red.synchronize() == frozenset()
        op, wire = comm.sent[-1]
        assert op == "sum"
        grads = torch.cat([e.reshape(-1) for e in reversed(expected)])
        assert torch.equal(wire[:grads.numel()], grads / 2)  # each rank's share, before the sum
        for p, e in zip(model.parameters(), expected):
            assert torch.equal(p.grad, e)  # the sum of two equal halves: the average


def test_every_parameter_in_exactly_one_bucket():
    sizes = [(i * 37) % 50 + 1 for i in range(40)]
    buckets = assign_buckets(sizes, [F32] * 40, 64)
    assert sorted(i for b in buckets for i in b) == list(range(40))
    assert all(sum(sizes[i] for i in b) >= 64 for b in buckets[:-1])


def test_bad_bucket_size_is_rejected():
    with pytest.raises(ValueError, match="bucket size must be > 0"):
        assign_buckets([4], [F32], 0)


def test_bucket_offsets():
    assert bucket_offsets([3, 1, 4]) == [0, 3, 4]


class FakeHvd(LocalComm):
    """The one-process engine, recording what it was asked to allreduce."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def _allreduce_async_(self, tensor, name, op):
        self.calls.append((name, tensor.numel()))
        return super()._allreduce_async_(tensor, name, op)


def test_buckets_launch_in_order_as_soon_as_complete_and_grads_become_views():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    named = list(model.named_parameters())  # 0.weight(16) 0.bias(4) 1.weight(8) 1.bias(2)
    hvd = FakeHvd()
    red = BucketedReducer(named, hvd, bucket_bytes=40)  # [1.bias,1.weight] [0.bias,0.weight]
    assert [[p.numel() for p in b] for b in red.buckets] == [[2, 8], [4, 16]]
    params = dict(named)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    red.grad_ready(params["0.bias"])
    red.grad_ready(params["0.weight"])  # bucket 1 is complete, but bucket 0 goes first
    assert hvd.calls == [] and red.in_flight() is False
    red.grad_ready(params["1.weight"])
    red.grad_ready(params["1.bias"])
    # each bucket carries one used-flag per member after its gradients
    assert hvd.calls == [("distrib.bucket.0", 2 + 8 + 2), ("distrib.bucket.1", 4 + 16 + 2)]
    assert red.in_flight()
    assert red.synchronize() == frozenset()  # every parameter was used
    assert not red.in_flight()
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 3.0))
        assert p.grad._base is not None  # a view of the bucket buffer: no copy back needed


def test_parameters_no_rank_used_are_reported_by_synchronize():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    red = BucketedReducer(list(model.named_parameters()), FakeHvd(), bucket_bytes=12, prefix="distrib.opt7")
    model[1].weight.grad = torch.ones(1, 2)
    for p in model.parameters():
        red.grad_ready(p, used=p is model[1].weight)  # with one worker, its flags are the average
    assert red.synchronize() == frozenset({model[0].weight, model[0].bias, model[1].bias})
    assert torch.count_nonzero(model[0].weight.grad) == 0  # took part in the average with zeros


def test_synchronize_before_all_grads_ready_is_an_error():
    model = torch.nn.Linear(2, 2)
    red = BucketedReducer(list(model.named_parameters()), FakeHvd(), bucket_bytes=4)
    model.weight.grad = torch.ones(2, 2)
    red.grad_ready(model.weight)
    with pytest.raises(RuntimeError, match="before every gradient was ready"):
        red.synchronize()


def test_unknown_reducer_choice_is_rejected(monkeypatch):
    monkeypatch.setenv("DISTRIB_REDUCER", "fastest")
    with pytest.raises(ValueError, match="DISTRIB_REDUCER='fastest'"):
        make_reducer(list(torch.nn.Linear(2, 2).named_parameters()), FakeHvd())


def check(tmp_path, controller, reducers, *extra):
    out = tmp_path / "grads.pt"
    run_launch(["-np", "2", "--controller", controller], SCRIPTS / "reducer_check.py",
               ["--reducers", reducers, "--out", out, *extra])
    ranks = torch.load(out)["ranks"]
    names = reducers.split(",")
    ref = ranks[0][names[0]]
    assert ref["reducer"] == "PerParameterReducer"
    for rank in ranks:
        for name in names:
            got = rank[name]
            assert got["reducer"] == "BucketedReducer" or name == "per-parameter"
            if name == "mpi":
                assert got["transport"] == "MpiTransport"
            for step_ref, step_got in zip(ref["grads"], got["grads"]):
                for k in step_ref:
                    if step_ref[k] is None:
                        assert step_got[k] is None, f"{name} {k}"
                    else:
                        torch.testing.assert_close(step_got[k], step_ref[k], rtol=0, atol=0, msg=f"{name} {k}")
            for k in ref["params"]:
                torch.testing.assert_close(got["params"][k], ref["params"][k], rtol=0, atol=0)
    # no rank used it: no gradient, so the optimizer skips it (as single-process torch does)
    assert ref["grads"][0]["unused.weight"] is None
    assert torch.equal(ref["params"]["unused.weight"], ranks[0]["initial"]["unused.weight"])
    # and the used ones were really averaged
    assert torch.count_nonzero(ref["grads"][0]["a.weight"]) > 0


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_bucketed_matches_per_parameter(tmp_path, controller):
    reducers = "per-parameter,horovod" + (",mpi" if controller == "mpi" else "")
    check(tmp_path, controller, reducers)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_bucketed_matches_per_parameter_with_fp16_compression_and_accumulation(tmp_path):
    check(tmp_path, "gloo", "per-parameter,horovod", "--compression", "fp16", "--accumulate", "2")
