"""precision=, compression="fp16", op="adasum" and shard="gradients"'s own promise, against plain torch.

Used by tests/test_precision.py: one launch of 2 workers (MPI controller: Horovod's Adasum needs
it) runs every case; rank 0 writes the numbers as JSON to --out.

- ``wire``: what crosses the wire with compression="fp16", read from the parameters: each rank's
  gradient is a known constant c, SGD(lr=1) moves the parameter by exactly the received average.
  fp16 keeps 1 + 2**-9 (bf16 would not), rounds 1 + 2**-12 to 1 and flushes 1e-9 to 0; a run
  that sends float64 moves by c itself.
- ``compression``: a float64 MLP, each rank its own samples, against float64 plain torch on the
  global batch: the difference must be fp16 rounding, neither more nor (ignored compression) ~0.
- ``bf16`` / ``fp16``: a float32 MLP under ``optimizer.autocast()`` against plain torch under
  ``torch.autocast`` on the global batch (and torch's GradScaler for fp16, with one step whose
  scaled gradients overflow: skipped, scale halved, on both sides). Every rank gets the same
  samples, so the per-rank rounding of the reduced-precision matmuls is the global batch's
  (the global batch's sums are twice one rank's): the results agree to float32 rounding, while
  autocast left off changes them by bf16/fp16 rounding. fp16 also saves and restores a
  checkpoint: the grad scaler's state must come back.
- ``adasum``: op="adasum", each rank its own samples, float64, against plain torch combining the
  two ranks' gradients of every tensor with Adasum's published formula
  (1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b.
Cases with ``shard=`` run the same with "optimizer" and "gradients"; for "gradients" every
``param.grad`` must be None after each ``step()`` (no full-size gradient survives the step).
"""
import argparse
import json
import tempfile
import traceback

import torch
import torch.nn.functional as F

import distrib
from distrib.checkpoint import CheckpointManager
from distrib.context import import_horovod

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--run-dir", required=True, help="for the fp16 checkpoint round trip (shared by the ranks)")
args = p.parse_args()

ctx = distrib.init(seed=0)
hvd = import_horovod()
torch.set_num_threads(1)
N, B, STEPS = ctx.size, 4, 4       # workers, samples per worker, steps
OVERFLOW_STEP = 2                  # fp16: this step's targets make the scaled gradients overflow
SHARDS = (None, "optimizer", "gradients")


def mlp(dtype):
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    if ctx.rank != 0:  # another init: wrap's broadcast must erase it
        with torch.no_grad():
            for q in model.parameters():
                q.add_(torch.randn_like(q))
    return model


def reference_mlp(dtype):
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def samples(dtype, same_on_every_rank: bool, overflow: bool = False):
    """x[step, rank], y[step, rank]: B samples each."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(STEPS, N, B, 8, generator=gen, dtype=dtype)
    y = torch.randn(STEPS, N, B, 1, generator=gen, dtype=dtype)
    if same_on_every_rank:
        x, y = x[:, :1].expand_as(x).clone(), y[:, :1].expand_as(y).clone()
    if overflow:
        y[OVERFLOW_STEP] *= 1e4  # the loss gradient times the scale (65536) is past fp16's 65504
    return x, y


def params_of(model):
    return torch.cat([q.detach().double().flatten() for q in model.parameters()])


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def train_distrib(dtype, data, shard=None, lr=0.1, **options):
    """distrib on this rank's samples; returns the final parameters, whether a full gradient
    survived a step, the grad scaler's state after each step, and the model and optimizer."""
    x, y = data
    model = mlp(dtype)
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), ctx, shard=shard, **options)
    grad_left, scales = False, []
    for step in range(STEPS):
        with opt.autocast():
            loss = F.mse_loss(model(x[step, ctx.rank]), y[step, ctx.rank])
        opt.backward(loss)
        opt.step()
        grad_left |= any(q.grad is not None for q in model.parameters())
        scales.append(opt.state_dict().get("grad_scaler"))
        opt.zero_grad()
    return params_of(model), grad_left, scales, model, opt


def train_plain(dtype, data, precision="fp32", lr=0.1):
    """Plain single-process torch on the global batch of every step (all ranks' samples)."""
    x, y = data
    model = reference_mlp(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    scales = []
    for step in range(STEPS):
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = F.mse_loss(model(x[step].reshape(N * B, 8)), y[step].reshape(N * B, 1))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.state_dict() if scaler.is_enabled() else None)
        opt.zero_grad()
    return params_of(model), scales


def agreement(got):
    """The largest difference between this rank's parameters and any rank's."""
    ranks = hvd.allgather_object(got, name=f"precision.ranks.{len(results)}")
    return max(max_diff(got, r) for r in ranks)


results, checks = {}, {}


def case(name):
    def register(fn):
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - recorded per case; the test fails on it
            results[name] = {"error": traceback.format_exc(limit=4)}
        return fn
    return register


for shard in SHARDS:
    tag = shard or "none"

    @case(f"wire-{tag}")
    def _():
        c = torch.tensor([1 + 2**-9, 1 + 2**-12, 1e-9], dtype=torch.float64)
        model = torch.nn.Linear(3, 1, bias=False).double()  # the loss (w * c).sum(): the gradient is c
        with torch.no_grad():
            model.weight.fill_(5.0)
        opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), ctx, shard=shard, compression="fp16")
        opt.backward((model.weight[0] * c).sum())
        opt.step()
        return {"error": None, "moved": (5.0 - model.weight.detach()[0]).tolist()}

    @case(f"compression-{tag}")
    def _():
        data = samples(torch.float64, same_on_every_rank=False)
        got, grad_left, _, _, _ = train_distrib(torch.float64, data, shard=shard, compression="fp16")
        exact, _ = train_plain(torch.float64, data)
        plain_fp64, *_ = train_distrib(torch.float64, data, shard=shard)
        return {"error": None, "vs_torch": max_diff(got, exact), "uncompressed_vs_torch": max_diff(plain_fp64, exact),
                "across_ranks": agreement(got), "grad_left": grad_left,
                "reference_moved": max_diff(exact, params_of(reference_mlp(torch.float64)))}

    @case(f"bf16-{tag}")
    def _():
        data = samples(torch.float32, same_on_every_rank=True)
        got, grad_left, _, _, _ = train_distrib(torch.float32, data, shard=shard, precision="bf16")
        want, _ = train_plain(torch.float32, data, precision="bf16")
        fp32, _ = train_plain(torch.float32, data)
        return {"error": None, "vs_torch": max_diff(got, want), "torch_bf16_vs_fp32": max_diff(want, fp32),
                "across_ranks": agreement(got), "grad_left": grad_left}

    @case(f"fp16-{tag}")
    def _():
        data = samples(torch.float32, same_on_every_rank=True, overflow=True)
        got, grad_left, scales, model, opt = train_distrib(torch.float32, data, shard=shard, precision="fp16")
        want, want_scales = train_plain(torch.float32, data, precision="fp16")
        fp32, _ = train_plain(torch.float32, data)
        # the scaler's state goes into a checkpoint and comes back into a new run
        run_dir = hvd.broadcast_object(tempfile.mkdtemp(dir=args.run_dir) if ctx.rank == 0 else None, root_rank=0,
                                       name=f"precision.dir.{tag}")
        with CheckpointManager(run_dir, ctx, async_save=False) as ckpt:
            ckpt.save(STEPS, {"model": model, "optimizer": opt})
        fresh = mlp(torch.float32)
        fresh_opt = distrib.wrap(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9), ctx, shard=shard,
                                 precision="fp16")
        restored_at = CheckpointManager(run_dir, ctx, async_save=False).restore({"model": fresh, "optimizer": fresh_opt})
        return {"error": None, "vs_torch": max_diff(got, want), "torch_fp16_vs_fp32": max_diff(want, fp32),
                "across_ranks": agreement(got), "grad_left": grad_left,
                "scales": [s and s["scale"] for s in scales], "torch_scales": [s["scale"] for s in want_scales],
                "restored_at": restored_at, "restored_scaler": fresh_opt.state_dict().get("grad_scaler"),
                "saved_scaler": scales[-1], "torch_scaler": want_scales[-1]}


def adasum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Horovod's Adasum of two tensors (its docs and paper): the formula the test holds it to."""
    dot = (a * b).sum()
    return (1 - dot / (2 * a.pow(2).sum())) * a + (1 - dot / (2 * b.pow(2).sum())) * b


@case("adasum")
def _():
    x, y = samples(torch.float64, same_on_every_rank=False)
    got, *_ = train_distrib(torch.float64, (x, y), op="adasum")
    model = reference_mlp(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged = reference_mlp(torch.float64)  # the same with a plain average: the case must tell them apart
    avg_opt = torch.optim.SGD(averaged.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        for net, optimizer, combine in ((model, opt, adasum), (averaged, avg_opt, lambda a, b: (a + b) / 2)):
            per_rank = []
            for rank in range(N):
                net.zero_grad()
                F.mse_loss(net(x[step, rank]), y[step, rank]).backward()
                per_rank.append([q.grad.clone() for q in net.parameters()])
            for q, a, b in zip(net.parameters(), *per_rank):
                q.grad = combine(a, b)
            optimizer.step()
    want = params_of(model)
    return {"error": None, "vs_formula": max_diff(got, want), "average_vs_formula": max_diff(params_of(averaged), want),
            "across_ranks": agreement(got)}


if ctx.rank == 0:
    with open(args.out, "w") as f:
        json.dump({"size": ctx.size, "controller": ctx.controller, "cases": results}, f, indent=1)
