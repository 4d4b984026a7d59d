"""The torch engine's shared-memory allreduce (distrib/comm/shared_memory.py) on the workers of one
host, against plain torch sums of every rank's inputs (gathered as Python lists): several rounds,
sum and average, three buckets (one of a single element), one round reduced in two parts, and a
buffer whose length is no multiple of a cache line. Rank 0 writes the results to --out."""
import argparse
import glob
import hashlib
import json
import os

import torch

import distrib
from distrib.comm.shared_memory import SHM_DIR, SharedMemoryTransport

NUMEL = 1001
BUCKETS = ((0, 300), (300, 301), (301, NUMEL))
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def one_round(transport, comm, dtype, seed: int, op: str, split: bool):
    region = transport.region()
    data = torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed * 100 + comm.rank), dtype=dtype)
    region.copy_(data)
    buckets = [region[a:b] for a, b in BUCKETS]
    if split:  # the first two buckets reduced before the last one is handed over
        first = [transport.allreduce_async_(b, name=f"t.{i}", op=op) for i, b in enumerate(buckets[:2])]
        first[0].wait()
        handles = first + [transport.allreduce_async_(buckets[2], name="t.2", op=op)]
    else:
        handles = [transport.allreduce_async_(b, name=f"t.{i}", op=op) for i, b in enumerate(buckets)]
    for handle in handles:
        handle.wait()
    inputs = torch.tensor(comm.allgather_object(data.tolist(), name="t.inputs"), dtype=dtype)
    expected = inputs.sum(0) / (comm.size if op == "average" else 1)
    digest = hashlib.sha256(region.numpy().tobytes()).hexdigest()
    return {"error": (region - expected).abs().max().item(), "tolerance": TOLERANCE[dtype],
            "digests": comm.allgather_object(digest, name="t.digest")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = distrib.init(engine="torch")
    comm = ctx.comm
    rounds = []
    for dtype in (torch.float32, torch.float64):
        transport = SharedMemoryTransport.open(comm, NUMEL, dtype, name=f"t.{dtype}")
        left_behind = glob.glob(os.path.join(SHM_DIR, f"distrib-{os.getpid()}-*"))
        for seed, (op, split) in enumerate([("average", False), ("sum", False), ("average", True), ("sum", True)]):
            rounds.append({"dtype": str(dtype), "op": op, "split": split, "left_behind": left_behind,
                           **one_round(transport, comm, dtype, seed, op, split)})
        transport.close()
    if ctx.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"size": ctx.size, "rounds": rounds}, f)


if __name__ == "__main__":
    main()
