"""Option validation of the data-parallel optimizer (no Horovod collective needed)."""
import re

import pytest
import torch

from distrib.context import Context
from distrib.step.optim import DistributedOptimizer, ReplicatedUpdate, overlap_step_enabled


@pytest.mark.parametrize("options,message", [
    ({"precision": "fp8"}, "precision='fp8' is not one of fp32, bf16, fp16"),
    ({"compression": "int4"}, "compression='int4' is not one of none, fp16"),
    ({"op": "max"}, "op='max' is not one of average, adasum"),
    ({"accumulate": 0}, "accumulate must be >= 1"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"precision": "fp16", "op": "adasum"}, "not supported"),
])
def test_bad_options_are_rejected_before_anything_runs(options, message):
    model = torch.nn.Linear(2, 1)
    ctx = Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match=message):
        DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx, **options)


@pytest.mark.parametrize("shard, reducer", [(None, "BucketedReducer"), ("optimizer", "BucketedReducer"),
                                            ("gradients", "ReduceScatterReducer")])
def test_the_reducer_is_chosen_before_it_is_built(monkeypatch, shard, reducer):
    """ZeRO stage 2 never allocates the full-size allreduce buckets it does not use (the update part,
    chosen first, hands the gradient exchange its reducer); the step is the same one-process math."""
    import distrib
    from distrib.step import reducers
    built = []
    real = reducers._Bucket.__init__
    monkeypatch.setattr(reducers._Bucket, "__init__", lambda self, *a: (built.append(a[0]), real(self, *a))[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    plain.load_state_dict(model.state_dict())
    ctx = Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")
    opt = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=0.1), ctx, shard=shard)
    assert type(opt._reducer).__name__ == reducer and opt.shard == shard
    assert bool(built) == (reducer == "BucketedReducer")
    assert callable(opt.owned_ranges) == (shard is not None)  # what checkpoints recognise a shard by
    ref = torch.optim.AdamW(plain.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (plain, ref)):
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)


def test_sharding_is_a_part_of_the_optimizer_not_a_subclass_of_it():
    """No import cycle: the sharding modules never import the optimizer they are a part of."""
    from pathlib import Path
    sharding = Path(__file__).resolve().parents[1] / "distrib" / "sharding"
    imports = re.compile(r"^\s*(from distrib(\.optim)? import|import distrib\.optim|from distrib\.optim import)", re.M)
    assert [p.name for p in sorted(sharding.glob("*.py")) if imports.search(p.read_text())] == []


@pytest.mark.parametrize("forced, expected", [(None, False), ("0", False), ("1", True)])
def test_the_step_overlaps_the_transfer_only_when_asked(monkeypatch, forced, expected):
    if forced is None:
        monkeypatch.delenv("DISTRIB_OVERLAP_STEP", raising=False)
    else:
        monkeypatch.setenv("DISTRIB_OVERLAP_STEP", forced)
    assert overlap_step_enabled() is expected


def test_a_bad_overlap_setting_is_refused_with_the_values_it_takes(monkeypatch):
    monkeypatch.setenv("DISTRIB_OVERLAP_STEP", "yes")
    with pytest.raises(ValueError, match="DISTRIB_OVERLAP_STEP='yes' must be 0 or 1"):
        overlap_step_enabled()


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize("optimizer, max_grad_norm, precision, expected", [
    (torch.optim.AdamW, None, "fp32", True),
    (torch.optim.SGD, None, "bf16", True),
    (_MySGD, None, "fp32", False),       # a subclass may couple parameters in its step
    (torch.optim.SGD, 1.0, "fp32", False),  # clipping needs the global norm first
    (torch.optim.SGD, None, "fp16", False),  # the scaler's inf check needs every gradient first
    (torch.optim.LBFGS, None, "fp32", False),
])
def test_only_a_step_that_treats_each_parameter_alone_is_split_by_bucket(optimizer, max_grad_norm, precision,
                                                                         expected):
    model = torch.nn.Linear(2, 1)
    update = ReplicatedUpdate(optimizer(model.parameters(), lr=0.1), make_reducer=None)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    assert update.steps_by_bucket(scaler, max_grad_norm) is expected


def test_stepping_bucket_by_bucket_gives_the_bits_of_one_step():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1) for m in models]
    split = ReplicatedUpdate(opts[1], make_reducer=None)
    params = list(models[1].parameters())
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for m in models:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        opts[0].step()
        split.step_params(params[2:])   # the last layer's bucket arrives first
        split.step_params(params[:2])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert all(len(g["params"]) == 4 for g in opts[1].param_groups)  # the groups are whole again
