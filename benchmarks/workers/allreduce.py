"""Allreduce time per size, alternating implementations in the same 2 processes (run under MPI).

Candidates: ``distrib`` (the default reducer, what a gradient goes through), ``per-parameter``
(distrib's first reducer, hvd.DistributedOptimizer's path), ``distrib-mpi`` (distrib's mpi4py
transport) and ``gloo`` (torch.distributed over Gloo). The raw mpi4py limit is not timed here:
beside Horovod's background thread it waits on MPI's lock; raw_allreduce.py times it in a job of
its own. Rank 0 writes {"sizes": [...], "ms": {candidate: {size: [per-round medians]}}} to --out.
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

import distrib  # noqa: E402
from benchmarks.stats import rotate  # noqa: E402
from distrib.reducers import make_reducer  # noqa: E402


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True, help="comma-separated byte counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--first-round", type=int, default=0,
                   help="index of the first round: a one-round launch then rotates the order like round r")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    ctx = distrib.init()
    import horovod.torch as hvd
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.size)
    barrier = comm.Barrier

    def reducer_call(choice, param):
        os.environ["DISTRIB_REDUCER"] = choice
        red = make_reducer([("w", param)], hvd)
        grad = torch.ones_like(param)

        def call():
            param.grad = grad  # a fresh gradient each step, as after zero_grad(set_to_none=True)
            red.grad_ready(param)
            red.synchronize()
        return call

    ms = {}
    for size in sizes:
        n = max(1, size // 4)
        reps = 30 if size <= 2**20 else 8
        param = torch.nn.Parameter(torch.zeros(n))
        buf = torch.ones(n)
        candidates = {
            "distrib": reducer_call("auto", param),
            "per-parameter": reducer_call("per-parameter", param),
            "distrib-mpi": reducer_call("mpi", param),
            "gloo": lambda: dist.all_reduce(buf),
        }
        names = list(candidates)
        for r in range(args.first_round, args.first_round + args.rounds):
            for name in rotate(names, r):
                ms.setdefault(name, {}).setdefault(str(size), []).append(1e3 * timed(candidates[name], barrier, reps))
    dist.destroy_process_group()
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps({"sizes": sizes, "size": ctx.size, "ms": ms}))


if __name__ == "__main__":
    main()
