"""Trains a small MLP for --steps steps with distrib and writes rank 0's parameters to --out.

Used by tests/test_data_parallel.py: N workers with per-worker batch b must end with the same
parameters as one worker with batch N*b.
"""
import argparse

import torch

import distrib

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, required=True)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--accumulate", type=int, default=1)
p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
p.add_argument("--plain", action="store_true", help="no distrib.wrap: the single-process script it replaces")
p.add_argument("--max-grad-norm", type=float, default=None)
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = distrib.init(seed=0)
torch.set_num_threads(1)  # the same reduction order whatever the world size
generator = torch.Generator().manual_seed(42)
x = torch.randn(96, 8, generator=generator, dtype=torch.float64)
y = torch.randn(96, 1, generator=generator, dtype=torch.float64)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
if ctx.rank != 0:  # a different init: the broadcast from rank 0 must erase it
    for param in model.parameters():
        torch.nn.init.normal_(param)
inner = {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
         "adam": lambda: torch.optim.Adam(model.parameters(), lr=0.01),
         # weight decay: a hidden optimizer step at wrap time would show (it decays the weights)
         "adamw": lambda: torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5)}[args.optimizer]()
if args.plain:
    assert ctx.size == 1 and args.accumulate == 1 and args.max_grad_norm is None
    optimizer = inner
    optimizer.backward = lambda loss: loss.backward()
else:
    optimizer = distrib.wrap(model, inner, ctx, accumulate=args.accumulate, max_grad_norm=args.max_grad_norm)
loader = distrib.ShardedLoader(torch.utils.data.TensorDataset(x, y), args.batch_size, ctx, seed=7)
batches = loader.forever()
for step in range(args.steps):
    for _ in range(args.accumulate):
        xb, yb = next(batches)
        optimizer.backward(torch.nn.functional.mse_loss(model(xb), yb))
    optimizer.step()
    optimizer.zero_grad()
gathered = [t for t in ctx.comm.allgather_object(
    {k: v.clone() for k, v in model.state_dict().items()}, name="equivalence.params")]
if ctx.rank == 0:
    torch.save({"params": gathered[0], "all_ranks": gathered, "size": ctx.size}, args.out)
