"""A tiny stand-in for examples/train_lm.py used by the Slurm tests: same resume/preemption flow.

Every step allreduces a tensor over Horovod; rank 0 appends {"step": n, ...} to
RUN_DIR/metrics.jsonl; a checkpoint (RUN_DIR/ckpt.pt, written atomically by rank 0) holds the
step. On SIGUSR2 it stops at the next step boundary, checkpoints, requeues through
distrib.job.preemption and exits 0.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import distrib
from distrib.job.preemption import PreemptionHandler


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()

    ctx = distrib.init(seed=0)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, metrics = run_dir / "ckpt.pt", run_dir / "metrics.jsonl"
    step, weight = 0, torch.zeros(4)
    if args.resume == "auto" and ckpt.exists():
        state = torch.load(ckpt)
        step, weight = state["step"], state["weight"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    print(f"rank {ctx.rank} size {ctx.size} local_rank {ctx.local_rank} controller {ctx.controller} "
          f"procid {os.environ.get('SLURM_PROCID')} start_step {step} restart {restart}", flush=True)

    def save() -> None:
        if ctx.is_main:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"step": step, "weight": weight}, tmp)
            os.replace(tmp, ckpt)
        ctx.comm.barrier(name=f"saved.{step}")  # barrier: the checkpoint exists on return

    preemption = PreemptionHandler()
    while step < args.steps:
        total = ctx.comm.allreduce(torch.full((4,), float(ctx.rank + 1)), op="sum", name="grad")
        weight -= 0.01 * total
        step += 1
        if ctx.is_main:
            append(metrics, {"step": step, "size": ctx.size, "restart": restart, "sum": total[0].item()})
        time.sleep(args.step_sleep)
        stopping = preemption.should_stop(ctx)
        if stopping or (args.checkpoint_every and step % args.checkpoint_every == 0):
            save()
        if stopping:
            if ctx.is_main:
                append(metrics, {"event": "preempted", "step": step})
            print(f"rank {ctx.rank}: stopping at step {step} ({preemption.decision})", flush=True)
            preemption.requeue(ctx)
            return 0
    save()
    preemption.close()
    if ctx.is_main:
        append(metrics, {"event": "final", "step": step})
    print(f"rank {ctx.rank}: finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
