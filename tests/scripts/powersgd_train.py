"""Trains a tiny float64 net with compression="powersgd" on 2+ ranks; rank 0 writes to --out
every step's parameters (after the step) and averaged gradients (before it).

Used by tests/test_powersgd.py, which replays the same batches in one process through a
reference PowerSGD and plain torch. Each rank's batch of step s, micro-batch k comes from a
generator seeded (1000 * rank + 10 * s + k). With --ckpt-dir: a CheckpointManager saves at
--save-at and the run resumes from it (--resume auto), for the kill-and-resume test.
"""
import argparse
import os

import torch

import distrib

p = argparse.ArgumentParser()
p.add_argument("--rank", type=int, default=2)
p.add_argument("--start-step", type=int, default=2)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--accumulate", type=int, default=1)
p.add_argument("--clip", type=float, default=None)
p.add_argument("--ckpt-dir", default=None)
p.add_argument("--save-every", type=int, default=0)
p.add_argument("--die-at", type=int, default=-1, help="exit with code 3 after this step's save (a kill)")
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = distrib.init(seed=0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.unused = torch.nn.Linear(12, 12)  # never in the forward pass
        self.b = torch.nn.Linear(32, 24)
        self.c = torch.nn.Linear(24, 1)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = Net()
opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01), ctx,
                   accumulate=args.accumulate, max_grad_norm=args.clip, compression="powersgd",
                   powersgd=distrib.PowerSGD(rank=args.rank, start_step=args.start_step))
state = {"model": model, "optimizer": opt}
start = 0
manager = None
if args.ckpt_dir:
    manager = distrib.CheckpointManager(args.ckpt_dir, ctx, async_save=False)
    resumed = manager.restore(state, "auto")
    start = 0 if resumed is None else resumed


def thread_nices():
    """(this thread's nice value, the set of the other threads' ones): Horovod's polling threads
    sit at 19 between low-rank steps on this CPU-only machine (distrib/comm/priority.py)."""
    def nice(tid):
        return int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
    return nice(os.getpid()), sorted({nice(int(t)) for t in os.listdir("/proc/self/task") if int(t) != os.getpid()})


records = []
for step in range(start, args.steps):
    for k in range(args.accumulate):
        gen = torch.Generator().manual_seed(1000 * ctx.rank + 10 * step + k)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
        opt.backward(torch.nn.functional.mse_loss(model(x), y))
    opt.synchronize()
    grads = {n: None if q.grad is None else q.grad.clone() for n, q in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    records.append({"step": step, "grads": grads,
                    "params": {n: q.detach().clone() for n, q in model.named_parameters()},
                    "nice": thread_nices()})
    if manager is not None and args.save_every and (step + 1) % args.save_every == 0:
        manager.save(step + 1, state)
        if step + 1 == args.die_at:
            os._exit(3)
gathered = ctx.comm.allgather_object(records, name="records")
if ctx.rank == 0:
    torch.save({"ranks": gathered, "world": ctx.size}, args.out)
