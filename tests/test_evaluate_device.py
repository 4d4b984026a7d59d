"""Device placement in evaluation: loaders yield host batches, ``distrib.evaluate`` moves each one
to the model's device before the metric function sees it (so a metric written on a CPU machine
runs unchanged on a GPU). CI has no GPU: the "meta" device stands in for it (a second device
that is not the CPU, where no value can be read)."""
import collections
import subprocess
import sys

import pytest
import torch

from distrib.evaluate import to_device
from tests.helpers import REPO

META = torch.device("meta")
Pair = collections.namedtuple("Pair", "x y")


@pytest.mark.parametrize("batch,check", [
    (torch.ones(2), lambda b: b.device == META),
    ((torch.ones(2), torch.zeros(2, dtype=torch.long)),
     lambda b: type(b) is tuple and all(t.device == META for t in b)),
    ([torch.ones(2), "label"], lambda b: type(b) is list and b[0].device == META and b[1] == "label"),
    ({"x": torch.ones(2), "n": 3}, lambda b: b["x"].device == META and b["n"] == 3),
    (Pair(torch.ones(1), [torch.ones(1)]), lambda b: type(b) is Pair and b.x.device == META and b.y[0].device == META),
    ({"nested": ({"deep": torch.ones(1)},)}, lambda b: b["nested"][0]["deep"].device == META),
    ("no tensors", lambda b: b == "no tensors"),
])
def test_to_device_moves_every_tensor_and_keeps_the_structure(batch, check):
    assert check(to_device(batch, META))


SCRIPT = """
import torch, distrib
ctx = distrib.init()
model = torch.nn.Linear(4, 2, device="meta")           # parameters on a device that is not the CPU
loader = distrib.eval_loader(torch.utils.data.TensorDataset(torch.randn(10, 4), torch.randn(10, 2)), 4, ctx)
seen = []

def metric(m, batch):
    seen.append({t.device.type for t in batch} | {m(batch[0]).device.type})
    return {"n": float(len(batch[0]))}, len(batch[0])

print(distrib.evaluate(model, loader, metric), seen)
"""


@pytest.mark.timeout(120)
def test_evaluate_hands_the_metric_batches_on_the_models_device():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 3 batches (4 + 4 + 2 samples), each on the model's device; the mean of per-batch sizes weighted by size
    assert proc.stdout.strip() == "{'n': 3.6} [{'meta'}, {'meta'}, {'meta'}]"
