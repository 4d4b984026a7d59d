"""A user's training script that writes a run directory: a small regression trained with the
installed distrib and logged with its MetricsLogger (tests/test_packaging.py copies it out of the
checkout and runs it with the installed distrib-launch).

    distrib-launch -np 2 installed_run.py RUN_DIR
"""
import sys

import torch

import distrib
from distrib.watch.metrics import MetricsLogger

STEPS, BATCH = 40, 16

run_dir = sys.argv[1]
ctx = distrib.init(seed=0)
data_rng = torch.Generator().manual_seed(0)  # the same data on every rank (each rank has its own stream)
x = torch.randn(1024, 8, generator=data_rng)
y = x @ torch.randn(8, 1, generator=data_rng)
model = torch.nn.Linear(8, 1)
optimizer = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.05), ctx)
batches = distrib.ShardedLoader(torch.utils.data.TensorDataset(x, y), BATCH, ctx, seed=0).forever()
log = MetricsLogger(run_dir, ctx, total_steps=STEPS, log_every=10, global_batch=BATCH * ctx.size)
for step in range(1, STEPS + 1):
    inputs, targets = next(batches)
    with log.phase("compute"):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
    with log.phase("optimizer"):
        optimizer.step()
    log.step(step, loss=loss.item(), lr=0.05)
# Which distrib the workers ran: the test checks it is the installed one, not the checkout's.
log.event("final", step=STEPS, distrib_file=distrib.__file__, distrib_version=distrib.__version__)
log.close()
