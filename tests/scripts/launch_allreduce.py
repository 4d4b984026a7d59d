"""Tiny worker for the launcher tests: allreduce of rank+1, then optional failure modes.

Horovod's allreduce, or with DISTRIB_ENGINE=torch (distrib-launch --engine torch) torch.distributed
over Gloo, initialised from torchrun's variables alone; such a worker also prints where it runs:
'torch rank=R local_rank=L local_size=N host=H master=ADDR:PORT'.

    --fail-rank R --fail-mode exit3|sigkill|sigstop|block  what rank R does after the allreduce
    --pid-dir DIR        each rank writes DIR/<rank>.pid (tests check that no worker survives)
    --beat-seconds S     after the allreduce, every rank (but a failing one) beats for S seconds
    --marker-dir DIR     with --fail-once: fail only while DIR/failed does not exist (restart test)
"""
import argparse
import os
import signal
import time

import socket

import torch

from distrib.watch.heartbeat import beat

TORCH = os.environ.get("DISTRIB_ENGINE") == "torch"
if TORCH:
    import torch.distributed as dist
else:
    import horovod.torch as hvd

p = argparse.ArgumentParser()
p.add_argument("--fail-rank", type=int, default=-1)
p.add_argument("--fail-mode", default="exit3")
p.add_argument("--pid-dir")
p.add_argument("--beat-seconds", type=float, default=0.0)
p.add_argument("--marker-dir")
args, _ = p.parse_known_args()  # under slurm/*.sbatch it also gets --run-dir ... (unused)



def allreduce_sum(value: float, name: str) -> float:
    if TORCH:
        tensor = torch.tensor([value])
        dist.all_reduce(tensor)
        return tensor.item()
    return hvd.allreduce(torch.tensor([value]), op=hvd.Sum, name=name).item()


if TORCH:
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, size = dist.get_rank(), dist.get_world_size()
    print(f"torch rank={rank} local_rank={os.environ['LOCAL_RANK']} local_size={os.environ['LOCAL_WORLD_SIZE']} "
          f"host={socket.gethostname()} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
else:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
if args.pid_dir:
    with open(os.path.join(args.pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
total = allreduce_sum(float(rank + 1), "sum")
print(f"rank={rank} size={size} sum={total:g} restart={os.environ.get('DISTRIB_RESTART_COUNT')}", flush=True)

failing = rank == args.fail_rank
if failing and args.marker_dir:
    marker = os.path.join(args.marker_dir, "failed")
    failing = not os.path.exists(marker)
    if failing:
        open(marker, "w").close()
if failing:
    print(f"rank {rank} about to fail ({args.fail_mode})", file=os.sys.stderr, flush=True)
    if args.fail_mode == "exit3":
        os._exit(3)
    if args.fail_mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if args.fail_mode == "sigstop":
        beat()
        os.kill(os.getpid(), signal.SIGSTOP)
deadline = time.time() + args.beat_seconds
while time.time() < deadline:
    beat()
    time.sleep(0.1)
if args.fail_rank >= 0 and not args.marker_dir:
    # The peers of a failing rank block in a collective that can never complete.
    allreduce_sum(1.0, "never")
if TORCH:
    dist.destroy_process_group()
    raise SystemExit(0)
if os.environ.get("HOROVOD_TIMELINE"):
    # Horovod's shutdown drops the timeline records its writer thread has not written yet (and, on
    # a loaded machine, that can be all of them: an empty file); stopping the timeline first waits
    # until every queued record is in the file and closes it. Only rank 0 writes a timeline.
    hvd.stop_timeline()
hvd.shutdown()
