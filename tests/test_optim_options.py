"""Option validation of the data-parallel optimizer (no Horovod collective needed)."""
import pytest
import torch

from distrib.context import Context
from distrib.optim import DistributedOptimizer


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
