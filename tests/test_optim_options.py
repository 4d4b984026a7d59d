"""Option validation of the data-parallel optimizer (no Horovod collective needed)."""
import re

import pytest
import torch

from distrib.context import Context
from distrib.step.optim import DistributedOptimizer


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
