"""Raw in-place MPI Allreduce (float32 sum) per size: the practical limit on one host.

Run under plain mpirun, in a job of its own. It imports neither Horovod nor distrib (nor torch)
on purpose: Horovod's background thread makes MPI calls of its own, and an mpi4py Allreduce in
the same process waits on MPI's lock behind it (~1 GB/s at 16 MiB instead of ~8 GB/s here).
Rank 0 writes {"sizes": [...], "size": n, "ms": {size: median ms per call}} to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI


def median_ms(comm, buf, reps: int) -> float:
    """Median ms of one in-place Allreduce of ``buf`` over ``reps`` calls. Call on all ranks."""
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)  # warm-up: the first call sets up the transport
    times = []
    for _ in range(reps):
        comm.Barrier()  # every rank enters together, so a late peer is not counted as transfer time
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True, help="comma-separated byte counts")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    comm = MPI.COMM_WORLD
    ms = {}
    for size in sizes:
        # zeros: repeated in-place sums of ones would overflow to inf after ~128 calls
        buf = np.zeros(max(1, size // 4), dtype=np.float32)
        ms[str(size)] = median_ms(comm, buf, reps=30 if size <= 2**20 else 10)
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps({"sizes": sizes, "size": comm.size, "ms": ms}))


if __name__ == "__main__":
    main()
