"""What checkpointing every K steps costs the training steps (run under ``python -m launch``).

2 workers train a model with distrib (AdamW, so the state is ~3x the parameters) in segments
of K steps; each segment starts with one checkpoint and ends when its K steps are done and
that checkpoint is committed. Variants, alternated in the same processes:

    none       no checkpoint (the reference)
    async      distrib's CheckpointManager(async_save=True): the steps run while a thread writes
    sync       CheckpointManager(async_save=False): the steps wait for the write
    dcp-async  torch.distributed.checkpoint.async_save of the same model and optimizer state
               (over a Gloo process group of the same 2 workers), waited for at the segment's end

A segment's time / the "none" segment's time - 1 is the overhead per K steps. Rank 0 writes
{"segments": {variant: [seconds per segment]}, "steps": {variant: [step ms, ...]}} to --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from benchmarks.stats import rotate  # noqa: E402
from benchmarks.workers.models import DEFAULT_BATCH, build  # noqa: E402

VARIANTS = ("none", "async", "sync", "dcp-async")


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="lm")
    p.add_argument("--every", type=int, default=100, help="K: steps per segment, one checkpoint each")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dir", type=Path, required=True, help="scratch folder for the checkpoints")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


class Savers:
    """One ``start(step)`` / ``finish()`` pair per variant; all ranks call both."""

    def __init__(self, root: Path, ctx, model, opt):
        from distrib.checkpoint import CheckpointManager
        self.state = {"model": model, "optimizer": opt}
        self.managers = {"async": CheckpointManager(root / "async", ctx, keep=2, async_save=True),
                         "sync": CheckpointManager(root / "sync", ctx, keep=2, async_save=False)}
        self.root, self.model, self.opt = root, model, opt
        self.pending = None

    def start(self, variant: str, step: int) -> None:
        if variant in self.managers:
            self.managers[variant].save(step, self.state)
        elif variant == "dcp-async":
            import torch.distributed.checkpoint as dcp
            state = {"model": self.model.state_dict(), "optimizer": self.opt.optimizer.state_dict()}
            self.pending = dcp.async_save(state, checkpoint_id=str(self.root / "dcp" / f"step-{step}"))

    def finish(self, variant: str) -> None:
        if variant == "async":
            self.managers[variant].wait()
        elif variant == "dcp-async":
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        for m in self.managers.values():
            m.close()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    import distrib
    import horovod.torch as hvd
    import torch.distributed as dist
    ctx = distrib.init()
    dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.size)  # DCP's collectives
    model, loss_fn = build(args.model, DEFAULT_BATCH[args.model])
    opt = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-4), ctx)

    def train_step():
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        return 1e3 * (time.perf_counter() - t)

    for _ in range(args.warmup):
        train_step()
    if ctx.rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
    hvd.allreduce(torch.zeros(1), name="dir-ready")  # rank 0 cleared the folder before anyone writes
    savers = Savers(args.dir, ctx, model, opt)
    segments = {v: [] for v in VARIANTS}
    steps = {v: [] for v in VARIANTS}
    step = 0
    for r in range(args.rounds):
        for variant in rotate(VARIANTS, r):
            hvd.allreduce(torch.zeros(1), name="segment")  # both ranks start the segment together
            t = time.perf_counter()
            savers.start(variant, step)
            for _ in range(args.every):
                steps[variant].append(train_step())
                step += 1
            savers.finish(variant)
            segments[variant].append(time.perf_counter() - t)
    savers.close()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps({"model": args.model, "every": args.every, "state_bytes": state_bytes,
                                              "segments": segments, "steps": steps}))
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
