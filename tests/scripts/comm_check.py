"""Every collective of distrib's communication layer on the engine the script was started on,
against what the same numbers give computed by hand. Used by tests/test_comm.py (2 workers,
Horovod through our launcher and torch.distributed under torchrun). Rank 0 writes JSON.

Last, on Horovod: rank 1 marks the world broken (as when it saw a peer die) and stays alive,
while rank 0 enters a collective that waits for it. Only rank 1 cutting its Gloo connections can
tell rank 0 (distrib/comm/ring_sockets.py): without that, rank 0 waits for ever (the test's
timeout fails it)."""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import distrib

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = distrib.init()
comm, rank, size = ctx.comm, ctx.rank, ctx.size
torch.set_default_dtype(torch.float64)
mine = torch.arange(6.0) + 10 * rank            # what rank r holds
every = [torch.arange(6.0) + 10 * r for r in range(size)]
total = sum(every)
got = {}

got["allreduce_average"] = torch.equal(comm.allreduce(mine, name="check.avg"), total / size)
got["allreduce_sum"] = torch.equal(comm.allreduce(mine, name="check.sum", op="sum"), total)
buf = mine.clone()
handle = comm.allreduce_async_(buf, name="check.async", op="average")
got["allreduce_async_average"] = torch.equal(handle.wait(), total / size) and torch.equal(buf, total / size)

x = mine.clone().requires_grad_()
(comm.allreduce(x, name="check.grad", op="sum") * (rank + 1)).sum().backward()
# d/dx_r of sum_s (s+1) * sum_q x_q: every rank's upstream gradient, summed
got["allreduce_is_differentiable"] = torch.equal(x.grad, torch.full((6,), float(sum(range(1, size + 1)))))

padded = torch.cat([mine, torch.zeros(-6 % size)])  # a multiple of the world size, as ZeRO pads
chunk = padded.numel() // size
out = torch.empty(chunk)
comm.reducescatter_into_async(padded, out, name="check.rs").wait()
want = torch.cat([total, torch.zeros(padded.numel() - 6)]) / size
got["reducescatter_into_average"] = torch.equal(out, want[rank * chunk:(rank + 1) * chunk])

full = torch.empty(6 * size)
comm.allgather_into_async(mine, full, name="check.ag").wait()
got["allgather_into"] = torch.equal(full, torch.cat(every))

shared = mine.clone()
comm.broadcast_async_(shared, root=size - 1, name="check.bcast").wait()
got["broadcast_from_last_rank"] = torch.equal(shared, every[-1])
named = [("a", mine.clone()), ("b", torch.tensor([rank]))]
comm.broadcast_tensors(named, root=0, prefix="check.tensors")
got["broadcast_tensors"] = torch.equal(named[0][1], every[0]) and int(named[1][1]) == 0

got["broadcast_object"] = comm.broadcast_object({"from": rank}, root=0, name="check.obj") == {"from": 0}
got["allgather_object"] = comm.allgather_object(("r", rank), name="check.objs") == [("r", r) for r in range(size)]
comm.barrier(name="check.barrier")
got["adasum"] = comm.supports_adasum


def nice_of(tid):
    return int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])


# The Horovod engine's own threads can be lowered and raised back (distrib/comm/priority.py); the
# training thread keeps its priority; the torch engine's threads are left alone.
def nices():
    return nice_of(os.getpid()), {nice_of(int(t)) for t in os.listdir("/proc/self/task") if int(t) != os.getpid()}


at_start = nices()
comm.set_engine_priority(19)
lowered = nices()
comm.set_engine_priority(0)
got["engine_threads_lowered_and_raised_only_on_horovod"] = (
    at_start == (0, {0}) and lowered[0] == 0 and (19 in lowered[1]) == (ctx.engine == "horovod")
    and nices() == (0, {0}))

everyone = comm.allgather_object(got, name="check.results")

peer_failure = None  # what rank 0's collective raised after rank 1 marked the world broken
told = Path(args.out + ".told")
if ctx.engine == "horovod" and rank == 1:
    comm.mark_broken(comm.failures[0]("injected: rank 1 saw a peer die"))
    while not told.exists():  # alive: its process ending would tell rank 0 too
        time.sleep(0.05)
elif ctx.engine == "horovod" and rank == 0:
    try:
        comm.allreduce(torch.ones(1), name="check.after_break")
    except comm.failures as exc:
        peer_failure = f"{type(exc).__name__}: {exc}"
if rank == 0:
    with open(args.out, "w") as f:
        json.dump({"engine": ctx.engine, "controller": ctx.controller, "size": size, "ranks": everyone,
                   "peer_failure": peer_failure}, f)
    told.write_text("done")
