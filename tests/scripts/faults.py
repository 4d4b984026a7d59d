"""A tiny training loop with one injected fault, for the launcher's failure reports (test_fault_table.py).

    python -m launch -np 2 --hang-timeout 3 tests/scripts/faults.py --fault KIND [--rank R] [--at STEP]

Every step: some compute (timed as "compute" by distrib.watch.metrics), then two named allreduces
through distrib's communication layer (``ctx.comm``: each one named to the launcher's heartbeat,
as every collective of distrib is): "grads.a" and "grads.b". At step ``--at`` rank ``--rank``
does KIND:

    none       nothing                     skip       leaves out grads.a
    order      calls b before a            shape      sends a with 5 elements instead of 4
    dtype      sends a as float32          loop       spins in a Python loop forever
    io         blocks reading a pipe that is never written
    sigstop    stops itself (SIGSTOP)      sigkill    kills itself (SIGKILL)
    exception  raises between starting grads.a and waiting for it
    deadlock   two threads take two locks in opposite orders
    linkdown   takes its host's network interfaces down (namespace hosts only)
    slow       (from the start) every step's compute takes 1.5 times as long; the run ends once
               rank 0's metrics.jsonl has the launcher's straggler event (or after --steps)

The lines a report must point at carry a ``FAULT:`` comment.
"""
import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time

import torch

import distrib
from distrib.watch.metrics import MetricsLogger

p = argparse.ArgumentParser()
p.add_argument("--fault", default="none")
p.add_argument("--rank", type=int, default=1)
p.add_argument("--at", type=int, default=5)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--run-dir", default=None)
args = p.parse_args()
run_dir = args.run_dir or tempfile.mkdtemp()

ctx = distrib.init(seed=0)
faulty_rank = ctx.rank == args.rank
metrics = MetricsLogger(run_dir, ctx, total_steps=args.steps, log_every=10)
weights = torch.randn(160, 160, dtype=torch.float64)  # ~20 ms a step: the 1.5x slow-down well above scheduling noise


def allreduce(name, tensor):
    return ctx.comm.allreduce(tensor, name=name, op="sum")


def collectives(faulty):
    a, b = torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    if faulty and args.fault == "skip":
        allreduce("grads.b", b)  # FAULT: skips a
        return
    if faulty and args.fault == "order":
        allreduce("grads.b", b)  # FAULT: b before a
        allreduce("grads.a", a)
        return
    if faulty and args.fault == "shape":
        a = torch.ones(5, dtype=torch.float64)  # FAULT: another shape
    if faulty and args.fault == "dtype":
        a = a.float()  # FAULT: another dtype
    if faulty and args.fault == "exception":
        ctx.comm.allreduce_async_(a, name="grads.a", op="sum")
        raise RuntimeError("injected failure inside grads.a")  # FAULT: raises in a collective
    allreduce("grads.a", a)
    allreduce("grads.b", b)


def deadlock():
    first, second = threading.Lock(), threading.Lock()

    def other():
        with second:
            time.sleep(0.2)
            with first:  # FAULT: deadlock, thread side
                pass
    threading.Thread(target=other, name="deadlock-partner", daemon=True).start()
    with first:
        time.sleep(0.2)
        with second:  # FAULT: deadlock, main side
            pass


def link_down():
    for name in os.listdir("/sys/class/net"):
        if name != "lo":
            subprocess.run(["ip", "link", "set", name, "down"], check=False)
    time.sleep(3600)  # the launcher stops this process


def inject():
    if args.fault == "loop":
        while True:  # FAULT: spins
            pass
    if args.fault == "io":
        read_end, _write_end = os.pipe()
        os.read(read_end, 1)  # FAULT: blocked in I/O
    if args.fault == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if args.fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if args.fault == "deadlock":
        deadlock()
    if args.fault == "linkdown":
        link_down()


for step in range(1, args.steps + 1):
    faulty = faulty_rank and step == args.at
    if faulty:
        print(f"rank {ctx.rank}: injecting {args.fault} at step {step}", flush=True)
    with metrics.phase("compute"):
        start = time.perf_counter()
        x = weights
        for _ in range(30):
            x = torch.tanh(x @ weights)
        if faulty_rank and args.fault == "slow":
            time.sleep(0.5 * (time.perf_counter() - start))  # FAULT: 1.5 times the compute
        if faulty:
            inject()
    with metrics.phase("allreduce"):
        collectives(faulty)
    metrics.step(step)
    if args.fault == "slow" and step % 10 == 0:  # every rank stops at the same step
        seen = ctx.rank == 0 and "straggler" in open(os.path.join(run_dir, "metrics.jsonl")).read()
        if allreduce("stop", torch.tensor([float(seen)])).item():
            break
metrics.close()
print(f"rank {ctx.rank} done", flush=True)
