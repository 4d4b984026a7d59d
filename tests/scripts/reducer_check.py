"""Averages the same gradients with each reducer and writes them (rank 0) to --out.

Used by tests/test_reducers.py: the bucketed reducers must give what the per-parameter one
gives, with an unused parameter, fp16 compression and gradient accumulation.
"""
import argparse
import os

import torch

import distrib

p = argparse.ArgumentParser()
p.add_argument("--reducers", default="per-parameter,horovod")
p.add_argument("--compression", default="none")
p.add_argument("--accumulate", type=int, default=1)
p.add_argument("--bucket-mb", default="0.001")  # a few hundred floats: several buckets
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = distrib.init(seed=0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.unused = torch.nn.Linear(4, 4)  # never in the forward pass
        self.b = torch.nn.Linear(32, 8)
        self.c = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


results = {}
torch.manual_seed(0)
initial = {n: q.detach().clone() for n, q in Net().named_parameters()}
for choice in args.reducers.split(","):
    os.environ["DISTRIB_REDUCER"] = choice
    os.environ["DISTRIB_BUCKET_MB"] = args.bucket_mb
    torch.manual_seed(0)
    model = Net()
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx,
                       accumulate=args.accumulate, compression=args.compression)
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # different data per rank
    grads = []
    for step in range(3):
        for _ in range(args.accumulate):
            x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
            opt.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.synchronize()
        grads.append({n: None if q.grad is None else q.grad.clone() for n, q in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=(step % 2 == 0))  # both ways of clearing
    opt.close()
    results["initial"] = initial
    results[choice] = {"grads": grads, "reducer": type(opt._reducer).__name__,
                       "transport": type(getattr(opt._reducer, "_transport", None)).__name__,
                       "params": {n: q.detach().clone() for n, q in model.named_parameters()}}
gathered = ctx.comm.allgather_object(results, name="reducer_check.results")
if ctx.rank == 0:
    torch.save({"ranks": gathered}, args.out)
