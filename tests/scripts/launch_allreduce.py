"""Tiny worker for the launcher tests: allreduce of rank+1, then optional failure modes.

    --fail-rank R --fail-mode exit3|sigkill|sigstop|block  what rank R does after the allreduce
    --pid-dir DIR        each rank writes DIR/<rank>.pid (tests check that no worker survives)
    --beat-seconds S     after the allreduce, every rank (but a failing one) beats for S seconds
    --marker-dir DIR     with --fail-once: fail only while DIR/failed does not exist (restart test)
"""
import argparse
import os
import signal
import time

import horovod.torch as hvd
import torch

from distrib.heartbeat import beat

p = argparse.ArgumentParser()
p.add_argument("--fail-rank", type=int, default=-1)
p.add_argument("--fail-mode", default="exit3")
p.add_argument("--pid-dir")
p.add_argument("--beat-seconds", type=float, default=0.0)
p.add_argument("--marker-dir")
args = p.parse_args()

hvd.init()
rank, size = hvd.rank(), hvd.size()
if args.pid_dir:
    with open(os.path.join(args.pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
total = hvd.allreduce(torch.tensor([float(rank + 1)]), op=hvd.Sum, name="sum").item()
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
    hvd.allreduce(torch.tensor([1.0]), name="never")
if os.environ.get("HOROVOD_TIMELINE"):
    # Horovod's shutdown drops the timeline records its writer thread has not written yet (and, on
    # a loaded machine, that can be all of them: an empty file); stopping the timeline first waits
    # until every queued record is in the file and closes it. Only rank 0 writes a timeline.
    hvd.stop_timeline()
hvd.shutdown()
