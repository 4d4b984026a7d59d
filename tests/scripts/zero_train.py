"""Sharded (ZeRO) training runs for tests/test_zero*.py: float64 MLP, global batch fixed by step.

``--math-out FILE``: first trains every case of MATH_CASES with shard="optimizer",
shard="gradients" and without sharding from the same initial weights, and (rank 0) the plain
single-process torch computation of the same global batches; writes every rank's final parameters
and the plain ones to FILE (one launch serves all the math cases and the run below).

Then one run with checkpoints (resume auto): --shard optimizer|gradients|none, --every K saves,
--stop-at S exits after saving step S. Rank 0 prints ``step N`` per step and at the end writes every
rank's parameters to --out (and, when the run is complete, plain torch's, computed in the process).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import distrib  # noqa: E402
from distrib.checkpoint import CheckpointManager  # noqa: E402

GLOBAL_BATCH, SAMPLES, BASE_LR = 12, 96, 0.02
# (optimizer, accumulate, max_grad_norm): Adam-type moments and momentum, accumulation, clipping
MATH_CASES = [("adamw", 1, None), ("adamw", 2, 0.05), ("sgd", 3, 0.05)]


def data():
    g = torch.Generator().manual_seed(42)
    return torch.randn(SAMPLES, 8, generator=g, dtype=torch.float64), torch.randn(SAMPLES, 1, generator=g,
                                                                                  dtype=torch.float64)


def batch(step):
    """The global batch of ``step`` (0-based): the same samples whatever the world size."""
    at = (step * GLOBAL_BATCH) % SAMPLES
    return list(range(at, at + GLOBAL_BATCH))


def make_model(seed=0):
    torch.manual_seed(seed)
    # odd sizes: parameters straddle ranks and buckets are padded
    return torch.nn.Sequential(torch.nn.Linear(8, 13), torch.nn.Tanh(), torch.nn.Linear(13, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 1)).double()


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9, weight_decay=0.01)
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    # two param groups: the partition is per group
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": rest, "weight_decay": 0.0}],
                             lr=BASE_LR)


def schedule(opt, total):
    return distrib.LRSchedule(opt, base_lr=BASE_LR, world_size=1, total_steps=total, warmup_steps=2, scaling="none")


def plain(kind, steps, max_norm, total=None):
    """Single-process torch on the whole global batch: what the sharded runs must equal (after
    ``steps`` steps of a schedule of ``total``)."""
    x, y = data()
    model = make_model()
    opt = make_optimizer(kind, model)
    sched = schedule(opt, total or steps)
    for step in range(steps):
        idx = batch(step)
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


def train_steps(ctx, model, opt, sched, first, last, accumulate, on_step=None):
    x, y = data()
    per_rank = GLOBAL_BATCH // ctx.size
    micro = per_rank // accumulate
    for step in range(first, last):
        mine = batch(step)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
        for m in range(accumulate):
            idx = mine[m * micro:(m + 1) * micro]
            opt.backward(torch.nn.functional.mse_loss(model(x[idx]), y[idx]))
        opt.synchronize()  # before step(), as train_lm does: must not reduce twice
        opt.step()
        opt.zero_grad()
        sched.step()
        if on_step is not None:
            on_step(step + 1)


def all_ranks_params(ctx, model):
    return ctx.comm.allgather_object({k: v.clone() for k, v in model.state_dict().items()}, name="zero.final")


def math_mode(args, ctx, out):
    results = {"size": ctx.size, "engine": ctx.engine, "cases": []}
    for kind, accumulate, max_norm in MATH_CASES:
        case = {"case": (kind, accumulate, max_norm), "sharded": {}}
        for shard in ("optimizer", "gradients", None):
            model = make_model(seed=0 if ctx.rank == 0 else 5)  # rank 1's init must be overwritten
            opt = distrib.wrap(model, make_optimizer(kind, model), ctx, shard=shard, accumulate=accumulate,
                               max_grad_norm=max_norm)
            train_steps(ctx, model, opt, schedule(opt, args.steps), 0, args.steps, accumulate)
            nbytes = opt._update.zero.nbytes() if shard else sum(
                v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
            norm = opt.last_grad_norm  # a tensor (reading it in the step would wait for a GPU)
            case["sharded"][shard or "none"] = {
                "ranks": all_ranks_params(ctx, model), "norm": None if norm is None else float(norm),
                "state_bytes": ctx.comm.allgather_object(nbytes, name="zero.bytes")}
        if ctx.rank == 0:
            case["plain"], _ = plain(kind, args.steps, max_norm)
            case["initial"] = make_model().state_dict()
        results["cases"].append(case)
    if ctx.rank == 0:
        torch.save(results, out)


def build(args, ctx, total):
    model = make_model(seed=0 if ctx.rank == 0 else 5)
    opt = distrib.wrap(model, make_optimizer("adamw", model), ctx, max_grad_norm=0.05,
                       shard=None if args.shard == "none" else args.shard)
    return model, opt, schedule(opt, total)


def train_mode(args, ctx):
    model, opt, sched = build(args, ctx, args.total)
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    ckpt = CheckpointManager(args.run_dir, ctx, keep=2, async_save=not args.sync)
    start = ckpt.restore(state, resume="auto") or 0
    end = args.stop_at or args.total

    def on_step(step):
        if ctx.rank == 0:
            print(f"step {step}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % args.every == 0 or step == end:
            ckpt.save(step, state)

    train_steps(ctx, model, opt, sched, start, end, 1, on_step)
    ckpt.close()
    params = all_ranks_params(ctx, model)
    if ctx.rank == 0:
        out = {"size": ctx.size, "engine": ctx.engine, "ranks": params, "step": end}
        if end == args.total:
            out["plain"], out["plain_optimizer"] = plain("adamw", args.total, 0.05)
        tmp = Path(f"{args.out}.tmp")
        torch.save(out, tmp)
        os.replace(tmp, args.out)
        print("done", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--math-out")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5, help="steps of each math case")
    p.add_argument("--shard", choices=["optimizer", "gradients", "none"], default="gradients")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--total", type=int, default=12, help="the run's last step (schedule length)")
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    os.environ["DISTRIB_BUCKET_MB"] = str(400 / 2**20)  # ~400-byte buckets: several, each cut across ranks
    ctx = distrib.init(seed=0)
    torch.set_num_threads(1)
    if args.math_out:
        math_mode(args, ctx, args.math_out)
    train_mode(args, ctx)


if __name__ == "__main__":
    main()
