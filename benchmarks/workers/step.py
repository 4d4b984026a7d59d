"""Time training steps of one implementation; rank 0 writes the timings to --out.

``--model mlp,lm`` times several models one after the other in the same processes (each with its
own warm-up), so that one launch serves them all: a launch costs more than the steps it times.
The file holds ``{"by_model": {"mlp": {...}, "lm": {...}}}``, one entry per model timed.

    alone     one process, plain torch
    distrib   distrib.wrap (run under the project launcher)
    horovod   plain hvd.DistributedOptimizer script (run under horovodrun / mpirun)
    ddp       torch DistributedDataParallel over Gloo (run under torchrun)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from benchmarks.workers.models import DEFAULT_BATCH, build  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["alone", "distrib", "horovod", "ddp"], required=True)
    p.add_argument("--model", default="mlp", help="mlp, lm, or a comma-separated list timed in this order")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reducers", default="",
                   help="distrib only: comma-separated DISTRIB_REDUCER choices, alternated in-process")
    p.add_argument("--segments", type=int, default=3, help="alternations of --reducers")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.models = args.model.split(",")
    if not set(args.models) <= {"mlp", "lm"}:
        p.error(f"--model: unknown model in {args.model!r}; choose from mlp, lm")
    if args.reducers and len(args.models) > 1:
        p.error("--reducers times one model; give one --model")
    return args


def setup(impl, model):
    """(rank, size, optimizer, step_fn(loss), barrier)"""
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)  # noqa: E731
    if impl == "alone":
        opt = sgd(model)

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()
        return 0, 1, step, lambda: None, model
    if impl == "distrib":
        import distrib
        ctx = distrib.init()  # idempotent: a second model reuses the job
        opt = distrib.wrap(model, sgd(model), ctx)

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()
        step.optimizer = opt
        import horovod.torch as hvd
        return ctx.rank, ctx.size, step, lambda: hvd.allreduce(torch.zeros(1), name="barrier"), model
    if impl == "horovod":
        import horovod.torch as hvd
        if not hvd.is_initialized():
            hvd.init()
        opt = hvd.DistributedOptimizer(sgd(model), named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()
        return hvd.rank(), hvd.size(), step, lambda: hvd.allreduce(torch.zeros(1), name="barrier"), model
    if impl == "ddp":
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = sgd(ddp)

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()
        return dist.get_rank(), dist.get_world_size(), step, dist.barrier, ddp
    raise AssertionError(impl)


def time_model(args, name, t_start):
    """Every timing of one model in this process; the dict one launch reports for it."""
    batch = args.batch_size or DEFAULT_BATCH[name]
    model, loss_fn = build(name, batch)
    rank, size, step, barrier, module = setup(args.impl, model)
    times = []
    first_step_done = None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        step(loss_fn(module))
        times.append(time.perf_counter() - t)
        if first_step_done is None:
            first_step_done = time.time()
    if args.reducers:
        result_by = _alternate_reducers(args, model, loss_fn, module, step)
    elif hasattr(step, "optimizer"):
        step.optimizer.close()  # its gradient hooks and buckets; the next model wraps its own
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"impl": args.impl, "model": name, "size": size, "batch": batch,
              "params": sum(p.numel() for p in model.parameters()), "grad_bytes": grad_bytes,
              "step_ms": [1e3 * x for x in times[args.warmup:]], "first_step_unix": first_step_done,
              "process_start_unix": t_start}
    if args.reducers:
        result["step_ms_by_reducer"] = result_by
    barrier()  # the next model starts together on every rank
    return rank, result


def main():
    args = parse_args()
    t_start = time.time()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    by_model = {}
    for name in args.models:
        rank, by_model[name] = time_model(args, name, t_start)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"by_model": by_model}))


def _alternate_reducers(args, model, loss_fn, module, first_step):
    """Median step time per reducer choice, alternated in the same processes (A B A B ...)."""
    import distrib
    first_step.optimizer.close()
    ctx = distrib.init()
    by = {}
    choices = args.reducers.split(",")
    for seg in range(args.segments):
        for choice in choices[seg % len(choices):] + choices[:seg % len(choices)]:
            os.environ["DISTRIB_REDUCER"] = choice
            opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), ctx)
            times = []
            for i in range(args.warmup + args.steps):
                t = time.perf_counter()
                opt.zero_grad()
                loss_fn(module).backward()
                opt.step()
                times.append(time.perf_counter() - t)
            opt.close()
            kept = sorted(times[args.warmup:])
            by.setdefault(choice, []).append(1e3 * kept[len(kept) // 2])
    return by


if __name__ == "__main__":
    main()
