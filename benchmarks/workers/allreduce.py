"""Allreduce time per size, alternating implementations in the same 2 processes (run under MPI).

Candidates: ``distrib`` (the default reducer, what a gradient goes through), ``per-parameter``
(distrib's first reducer, hvd.DistributedOptimizer's path) and ``distrib-mpi`` (distrib's mpi4py
transport), under MPI. ``--gloo`` instead times torch.distributed's Gloo allreduce in a job of
its own (torchrun, no Horovod whose background thread would compete for the cores). The raw
mpi4py limit is not timed here: beside Horovod's background thread it waits on MPI's lock;
raw_allreduce.py times it in a job of its own.
Rank 0 writes {"sizes": [...], "ms": {candidate: {size: [per-round medians]}}} to --out.
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
import torch.distributed as dist  # noqa: E402

from benchmarks.stats import rotate  # noqa: E402


def timed(fn, barrier, reps):
    """Median seconds of ``fn`` over ``reps`` calls, each started together on all ranks."""
    fn()  # warm-up (Horovod negotiates a new name once)
    times = []
    for _ in range(reps):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def distrib_candidates():
    """(rank, size, barrier, {name: factory(param) -> call}) in a Horovod job under MPI."""
    import distrib
    from distrib.step.reducers import make_reducer
    from mpi4py import MPI
    ctx = distrib.init()

    def reducer_call(choice):
        def factory(param):
            os.environ["DISTRIB_REDUCER"] = choice
            red = make_reducer([("w", param)], ctx.comm)
            grad = torch.ones_like(param)

            def call():
                param.grad = grad  # a fresh gradient each step, as after zero_grad(set_to_none=True)
                red.grad_ready(param)
                red.synchronize()
            return call
        return factory
    names = {"distrib": "auto", "per-parameter": "per-parameter", "distrib-mpi": "mpi"}
    return ctx.rank, ctx.size, MPI.COMM_WORLD.Dup().Barrier, {n: reducer_call(c) for n, c in names.items()}


def gloo_candidates():
    """The same for torch.distributed over Gloo, in a torchrun job."""
    dist.init_process_group("gloo")

    def factory(param):
        buf = torch.ones_like(param)
        return lambda: dist.all_reduce(buf)
    return dist.get_rank(), dist.get_world_size(), dist.barrier, {"gloo": factory}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True, help="comma-separated byte counts")
    p.add_argument("--gloo", action="store_true", help="time torch.distributed Gloo (under torchrun)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--first-round", type=int, default=0,
                   help="index of the first round: a one-round launch then rotates the order like round r")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rank, size, barrier, factories = gloo_candidates() if args.gloo else distrib_candidates()
    ms = {}
    for nbytes in sizes:
        reps = 30 if nbytes <= 2**20 else 8
        param = torch.nn.Parameter(torch.zeros(max(1, nbytes // 4)))
        candidates = {name: make(param) for name, make in factories.items()}
        for r in range(args.first_round, args.first_round + args.rounds):
            for name in rotate(list(candidates), r):
                ms.setdefault(name, {}).setdefault(str(nbytes), []).append(1e3 * timed(candidates[name], barrier, reps))
    if args.gloo:
        dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"sizes": sizes, "size": size, "ms": ms}))


if __name__ == "__main__":
    main()
