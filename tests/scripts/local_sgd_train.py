"""Trains a tiny float64 net with local_sgd= on 2+ ranks; rank 0 writes to --out every rank's
parameters after every step.

Used by tests/test_local_sgd.py, which replays the same batches in one process (plain torch on
the global batch for --every 1, a simulation of the ranks for --every > 1). Each rank's batch of
step s, micro-batch k comes from a generator seeded (1000 * rank + 10 * s + k). --inner sgd
(momentum, weight decay) or adamw; --outer plain (lr 1) or nesterov (DiLoCo's 0.7 / 0.9). With
--ckpt-dir: a CheckpointManager saves every --save-every steps and the run resumes from it.
"""
import argparse
import os

import torch

import distrib
from local_sgd_model import Net, batch, inner  # this script's folder is on sys.path

p = argparse.ArgumentParser()
p.add_argument("--every", type=int, default=3)
p.add_argument("--inner", choices=("sgd", "adamw"), default="sgd")
p.add_argument("--outer", choices=("plain", "nesterov"), default="plain")
p.add_argument("--steps", type=int, default=7)
p.add_argument("--accumulate", type=int, default=1)
p.add_argument("--ckpt-dir", default=None)
p.add_argument("--save-every", type=int, default=0)
p.add_argument("--die-at", type=int, default=-1, help="exit with code 3 after this step's save (a kill)")
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = distrib.init(seed=0)


torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = Net()
config = (distrib.LocalSGD(every=args.every) if args.outer == "plain" else distrib.LocalSGD.diloco(every=args.every))
opt = distrib.wrap(model, inner(model.parameters(), args.inner), ctx, accumulate=args.accumulate, local_sgd=config)
state = {"model": model, "optimizer": opt}
start = 0
manager = None
if args.ckpt_dir:
    manager = distrib.CheckpointManager(args.ckpt_dir, ctx, async_save=False)
    resumed = manager.restore(state, "auto")
    start = 0 if resumed is None else resumed
records = []
for step in range(start, args.steps):
    for k in range(args.accumulate):
        x, y = batch(ctx.rank, step, k)
        opt.backward(torch.nn.functional.mse_loss(model(x), y))
    opt.step()
    opt.zero_grad()
    records.append({"step": step, "params": {n: q.detach().clone() for n, q in model.named_parameters()}})
    if manager is not None and args.save_every and (step + 1) % args.save_every == 0:
        manager.save(step + 1, state)
        if step + 1 == args.die_at:
            os._exit(3)
gathered = ctx.comm.allgather_object(records, name="records")
if ctx.rank == 0:
    torch.save({"ranks": gathered, "world": ctx.size}, args.out)
