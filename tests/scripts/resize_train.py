"""Trains on a data set whose inputs are their own indices, logging who trained on what.

Used by tests/test_resize_resume.py: a run checkpointed mid-epoch on N workers and resumed on M
must consume every sample of the epoch exactly once. Rank 0 appends one JSON line per step to
--log: {"step", "size", "lr", "indices": [every rank's sample indices of that step]}.
With --stop-at S the run saves a checkpoint after step S and exits (a clean stop mid-epoch).
"""
import argparse
import json

import torch

import distrib
from distrib.checkpoint import CheckpointManager

p = argparse.ArgumentParser()
p.add_argument("--run-dir", required=True)
p.add_argument("--log", required=True)
p.add_argument("--steps", type=int, required=True, help="the step to end at")
p.add_argument("--stop-at", type=int, default=0)
p.add_argument("--samples", type=int, default=88)
p.add_argument("--batch-size", type=int, default=4)
args = p.parse_args()

BASE_LR, TOTAL_STEPS, WARMUP = 0.01, 40, 3  # the schedule is the same whatever --steps says
ctx = distrib.init(seed=0)
index = torch.arange(args.samples, dtype=torch.float32).unsqueeze(1)
dataset = torch.utils.data.TensorDataset(index, index * 0.5)
model = torch.nn.Linear(1, 1)
optimizer = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=BASE_LR), ctx)
schedule = distrib.LRSchedule(optimizer, base_lr=BASE_LR, world_size=ctx.size, total_steps=TOTAL_STEPS,
                              warmup_steps=WARMUP)
loader = distrib.ShardedLoader(dataset, args.batch_size, ctx, seed=11)
state = {"model": model, "optimizer": optimizer, "scheduler": schedule, "loader": loader}
checkpoints = CheckpointManager(args.run_dir, ctx, keep=2, async_save=False)
step = checkpoints.restore(state, resume="auto") or 0
batches = loader.forever()
while step < args.steps:
    lr = optimizer.param_groups[0]["lr"]
    x, y = next(batches)
    assert x[:, 0].long().tolist() == loader.last_indices  # the batch is the samples the loader says
    optimizer.backward(torch.nn.functional.mse_loss(model(x), y))
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()
    step += 1
    everyone = ctx.comm.allgather_object(loader.last_indices, name="indices")
    if ctx.rank == 0:
        with open(args.log, "a") as f:
            f.write(json.dumps({"step": step, "size": ctx.size, "lr": lr, "indices": everyone}) + "\n")
    if step == args.stop_at:
        checkpoints.save(step, state)
        break
checkpoints.close()
