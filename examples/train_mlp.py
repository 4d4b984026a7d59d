"""The bare distrib API on a small MLP regression task (synthetic data, made in memory).

    python -m launch -np 2 examples/train_mlp.py
"""
import torch

import distrib

ctx = distrib.init(seed=0)                                     # 1. start the engine (Horovod; torch.distributed under torchrun), learn rank/size/device

# Synthetic regression: y = x @ w_true + noise, identical on every rank: drawn from a generator of
# its own, because init(seed=0) gives each rank its own random stream (for dropout, augmentation).
data_rng = torch.Generator().manual_seed(0)
x = torch.randn(4096, 32, generator=data_rng)
y = x @ torch.randn(32, 1, generator=data_rng) + 0.01 * torch.randn(4096, 1, generator=data_rng)
dataset = torch.utils.data.TensorDataset(x, y)

model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(ctx.device)
optimizer = distrib.wrap(model, torch.optim.Adam(model.parameters(), lr=0.01), ctx)  # 2. average gradients
schedule = distrib.LRSchedule(optimizer, base_lr=0.01, world_size=ctx.size, scaling="sqrt",      # 3. scale lr with workers
                              total_steps=300, warmup_steps=20)
loader = distrib.ShardedLoader(dataset, batch_size=32, ctx=ctx, seed=0)            # 4. 1/N of every batch

batches = loader.forever()
for step in range(1, 301):
    inputs, targets = next(batches)
    loss = torch.nn.functional.mse_loss(model(inputs.to(ctx.device)), targets.to(ctx.device))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()                                            # waits for the allreduce, then steps
    schedule.step()
    if step % 50 == 0:
        distrib.rank0_print(ctx, f"step {step} loss {loss.item():.4f} lr {schedule.lr:.4f}")  # 5. print once
